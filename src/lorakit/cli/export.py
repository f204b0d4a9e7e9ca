"""`lorakit export SRC --out FILE.gguf`: a run, an adapter or a model as a GGUF file for llama.cpp."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lorakit.gguf_export import ADAPTER_QUANTS, QUANTS

CHECK_RECORDS = 4  # held-out records the merge check runs


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a GGUF file for llama.cpp / Ollama (merged model or adapter)",
                       description="Write a GGUF file that llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs. "
                                   "Default: the adapter merged into its base in float32 (an NF4 base is dequantized "
                                   "first), with the tokenizer and chat template, after a merge check on held-out "
                                   "texts. --adapter-only: the adapter alone as a llama.cpp LoRA adapter (--lora).")
    p.add_argument("source", help="a lorakit run directory, an adapter directory (with --base), "
                                  "or a transformers model directory")
    p.add_argument("--out", required=True, help="output .gguf file (must not exist)")
    p.add_argument("--base", help="base model directory for an adapter directory "
                                  "(default: the adapter's base_model_name_or_path, if local)")
    p.add_argument("--quant", choices=QUANTS, default=None,
                   help=f"tensor format (default f16; --adapter-only: {', '.join(ADAPTER_QUANTS)}, default f32)")
    p.add_argument("--adapter-only", action="store_true", help="write the adapter alone (llama.cpp --lora)")
    p.add_argument("--no-check", action="store_true", help="skip the merge check")
    p.set_defaults(run=run)


def run(args) -> int:
    from lorakit.cli.common import load, resolve_source
    from lorakit.gguf_export import check_output_path, export_adapter, export_merged

    out = check_output_path(args.out)
    src = Path(args.source)
    is_run = (src / "config.yaml").is_file() and (src / "adapter").is_dir()
    is_adapter = is_run or (src / "adapter_config.json").is_file()
    if not is_adapter and not (src / "config.json").is_file():
        raise ValueError(f"{src}: neither a lorakit run directory (config.yaml + adapter/), an adapter directory "
                         "(adapter_config.json) nor a transformers model directory (config.json)")
    if args.adapter_only and not is_adapter:
        raise ValueError(f"--adapter-only: {src} is a model directory, not an adapter or a run directory")
    # Always float32: the merge is W + scale·B A in float32, exactly as merge_and_unload.
    flags = SimpleNamespace(adapter=str(src) if is_adapter else None, model=args.base if is_adapter else str(src),
                            quantize=None, dtype="float32")
    source = resolve_source(flags)
    source.dtype = "float32"
    if is_adapter:
        check_base(source)
    model, tokenizer = load(source)
    name = (source.adapter.parent.name if is_run else src.name) or "lorakit export"
    if args.adapter_only:
        path = export_adapter(model, out, args.quant or "f32", name=name)
        print(f"wrote {path} (LoRA adapter for llama.cpp: llama-cli -m BASE.gguf --lora {path.name})")
        return 0
    check_ids = run_test_ids(src, tokenizer) if is_run and not args.no_check else None
    quant = args.quant or "f16"
    path, result = export_merged(model, tokenizer, out, quant, check_ids=check_ids,
                                 check=not args.no_check, name=name, progress=True)
    if result is not None:
        print(result.line())
    print(f"wrote {path} ({quant}; run it: llama-cli -m {path.name})")
    return 0


def check_base(source) -> None:
    """An adapter's base must be a local model directory (or the built-in default)."""
    from lorakit.models import DEFAULT_MODEL

    base = source.model
    if base is None or base == DEFAULT_MODEL or (Path(base) / "config.json").is_file():
        return
    raise ValueError(f"adapter {source.adapter}: its base model {base!r} is not a local model directory; "
                     "pass --base MODEL_DIR (a transformers directory with config.json)")


def run_test_ids(run_dir: Path, tokenizer) -> list[list[int]] | None:
    """Token ids of the first records of a run's held-out test split, formatted as the run did."""
    from lorakit.config import RunConfig, load_yaml
    from lorakit.training.setup import load_data

    config = RunConfig.from_dict(load_yaml((run_dir / "config.yaml").read_text()))
    _, _, test = load_data(config, tokenizer)
    if test is None:
        return None
    return [list(e.input_ids) for e in test.examples[:CHECK_RECORDS]]
