"""The package's import graph: no cycle, no edge up the layers, no private name of another module.

Every `import` counts, including those inside functions (a lazy import hides a dependency, it does
not remove it). Layers, leaves first (docs/architecture.md draws the same picture): a module may
import from its own layer or below, never above.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"

LAYERS = [
    # leaves: files, names, patterns, the built-in tasks
    {"files", "dtypes", "patterns", "tasks"},
    # the run's vocabulary and its data
    {"config", "data", "preference_data", "datacheck"},
    # the math core
    {"attention", "dropout", "fused", "gated_mlp", "lean", "layer", "loss", "nf4", "rms_norm", "surgery",
     "initialisation"},
    # adapters on models, their files, loading models
    {"inject", "adapter_io", "models", "merge_check", "optim"},
    # the places adapters go: transformers' Trainer, GGUF, serving engines; the planner
    {"hf_trainer", "gguf_export", "serving", "planner"},
    # running: processes, watching a run, the training loop
    {"distributed", "monitor"},
    {"training"},
    # comparing runs: LoRA against full fine-tuning (lorakit probe)
    {"probe"},
    # the command line and the package's front door
    {"cli", "lorakit", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported lorakit module, imported name or None)}, lazy imports included."""
    out = {}
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = out.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if target.split(".")[0] != "lorakit":
                    continue
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    if (SRC.parent / (submodule.replace(".", "/") + ".py")).exists() or \
                            (SRC.parent / submodule.replace(".", "/")).is_dir():
                        found.add((submodule, None))  # `from lorakit import train` names a module
                    else:
                        found.add((target, alias.name))
            elif isinstance(node, ast.Import):
                found.update((a.name, None) for a in node.names if a.name.split(".")[0] == "lorakit")
    return out


def component(module: str) -> str:
    """The unit the layers list: lorakit.training.loop -> training, lorakit -> lorakit."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_has_a_layer():
    assert sorted({component(m) for m in imports()} - LAYER.keys()) == []


def test_no_module_imports_from_a_higher_layer():
    upward = sorted(f"{m} -> {t} ({component(m)}: layer {LAYER[component(m)]}, {component(t)}: layer "
                    f"{LAYER[component(t)]})" for m, edges in imports().items() for t, _ in edges
                    if LAYER[component(t)] > LAYER[component(m)])
    assert upward == []


def test_no_import_cycle():
    graph = {m: {t for t, _ in edges if t != m} for m, edges in imports().items()}
    for m in graph:  # a module's package __init__ runs first; it is not an edge of the module's own
        graph[m] = {t for t in graph[m] if not m.startswith(t + ".")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_imports_a_private_name_of_another():
    private = sorted(f"{m} imports {t}.{name}" for m, edges in imports().items() for t, name in edges
                     if name and name.startswith("_") and not name.startswith("__") and t != m)
    assert private == []


def test_importing_lorakit_first_puts_torchs_large_cpu_tensors_on_huge_pages():
    """torch reads THP_MEM_ALLOC_ENABLE once, at its import: lorakit sets it when it comes first,
    leaves it alone when torch is already loaded, and never overrides the user's value."""
    import subprocess
    import sys

    def env_after(code, **env):
        import os

        environ = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
        code += "; import os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
        return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True,
                              check=True).stdout.split()[-1]

    assert env_after("import lorakit") == "1"
    assert env_after("import torch, lorakit") == "None"
    assert env_after("import lorakit", THP_MEM_ALLOC_ENABLE="0") == "0"
