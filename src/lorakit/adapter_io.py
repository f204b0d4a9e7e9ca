"""Saving and loading adapters in PEFT's directory layout.

    DIR/adapter_config.json        PEFT's LoraConfig fields, sorted, indent 2
    DIR/adapter_model.safetensors  base_model.model.<module path>.lora_A.weight  (r, in)
                                   base_model.model.<module path>.lora_B.weight  (out, r)
                                   ...lora_embedding_A (r, num), ...lora_embedding_B (dim, r)
                                   ...lora_magnitude_vector (out,) for DoRA (no ".weight": peft's key)
                                   <modules_to_save path>.weight, biases when bias != "none"
                                   <module path>.[base_layer.]*lora_A.weight  (r·E, in)  target_parameters
                                   <module path>.[base_layer.]*lora_B.weight  (out, r·E)

LoRA on parameters (target_parameters) is stored as peft stores it: peft wraps the module holding
the parameter, once per targeted parameter, the first in the module's own order innermost, so
parameter i of k on a module is written under "base_layer." repeated k - 1 - i times (Mixtral's
experts: gate_up_proj under "experts.base_layer.lora_A.weight", down_proj under "experts.lora_A.weight").

PiSSA and OLoRA train on a rewritten base W_res = W - scale · B₀ A₀. save_adapter writes what they
learned as an adapter of the ORIGINAL base (as peft's path_initial_model_for_weight_conversion):
W_res + scale · B A = W + scale · (B A - B₀ A₀) = W + scale · [B | -B₀] [A; A₀], a plain adapter
of rank 2r with the same scale (alpha doubled; times √2 with rslora). The initial (A₀, B₀) are kept
in memory from the initialisation on (LoraLayer.initial_adapters, a CPU copy, the adapter's size).
A DoRA magnitude needs no change: ||W_res + scale · B A|| is ||W + ΔW'|| of the converted adapter.

Loading is strict: a missing key, an unexpected key or a shape mismatch is an error that names
them, and the model is left as it was. Pickle files (adapter_model.bin) are never unpickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .config import ConfigError, LoraConfig
from .files import describe, open_safetensors, read_json_object, replacing
from .inject import add_lora, adapter_configs, check_adapter_names, delete_adapter, lora_layers, parameter_adapters
from .layer import LoraEmbedding, LoraLayer, ModulesToSave
from .patterns import pattern_problem

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# The inits whose adapters save_adapter converts for the original base. LoftQ's belongs to its
# 4-bit base Q, no low-rank adapter of W: loading it splits W again into the same Q (deterministic).
CONVERTED_INITS = ("pissa", "olora")


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under their on-disk names (live tensors, not copies)."""
    check_adapter_names(model, [name])
    config = adapter_configs(model)[name]
    out = {}
    for module_name, module in model.named_modules():
        prefix = PREFIX + module_name + "."
        if isinstance(module, ModulesToSave) and name in module.modules_to_save:
            # PEFT stores a fully trained module under its plain path.
            for key, t in module.modules_to_save[name].state_dict(keep_vars=True).items():
                out[prefix + key] = t
        elif isinstance(module, LoraLayer) and name in module.rank:
            if isinstance(module, LoraEmbedding):
                out[prefix + "lora_embedding_A"] = module.lora_embedding_A[name]
                out[prefix + "lora_embedding_B"] = module.lora_embedding_B[name]
            else:
                out[prefix + "lora_A.weight"] = module.lora_A[name].weight
                out[prefix + "lora_B.weight"] = module.lora_B[name].weight
            if name in module.lora_magnitude_vector:
                out[prefix + "lora_magnitude_vector"] = module.lora_magnitude_vector[name]
            if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                out[prefix + "base_layer.bias"] = module.base_layer.bias
    out.update(_parameter_adapter_tensors(model, name))
    if config.bias == "all":
        for key, t in model.named_parameters():
            if key.endswith("bias") and ".lora_" not in key and ".original_module." not in key \
                    and ".modules_to_save." not in key:
                out[PREFIX + key] = t
    return out


def _parameter_adapter_tensors(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """A and B of adapter `name` on parameters, under peft's nested keys (module docstring)."""
    by_module: dict[str, list] = {}
    for module_name, _, _, lora in parameter_adapters(model):
        by_module.setdefault(module_name, []).append(lora)
    out = {}
    for module_name, loras in by_module.items():
        for i, lora in enumerate(loras):
            if name in lora.rank:
                prefix = PREFIX + module_name + "." + "base_layer." * (len(loras) - 1 - i)
                out[prefix + "lora_A.weight"] = lora.lora_A[name].weight
                out[prefix + "lora_B.weight"] = lora.lora_B[name].weight
    return out


def _fan_in_fan_out(model: nn.Module, name: str) -> bool:
    """PEFT's fan_in_fan_out: the adapter sits on Conv1D layers (GPT-2), full precision or 4-bit."""
    return any(getattr(m, "fan_in_fan_out", False) or getattr(m.base_layer, "fan_in_fan_out", False)
               for _, m in lora_layers(model) if name in m.rank)


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default",
                 original_base: bool = True) -> Path:
    """Write adapter `name` to `directory` in PEFT's layout. Both files are first written in full
    to temporary names, then renamed back to back (weights, then config), so a failed or
    interrupted save leaves the previous adapter (weights and config together) as it was, and
    never a half-written file.

    original_base: an adapter initialised by PiSSA or OLoRA is written for the original base (rank
    2r, see the module docstring), the one to ship. False writes it as trained, with its init in
    adapter_config.json: loading it (lorakit or peft) splits the original base again and then
    sets A and B, the same model when the split is deterministic (full SVD, QR; not pissa_niter,
    which draws random numbers): what a checkpoint to resume from needs.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: t.detach().contiguous().clone().cpu() for k, t in adapter_state_dict(model, name).items()}
    config = adapter_configs(model)[name]
    if original_base and config.init in CONVERTED_INITS:
        tensors, config = initial_adapter(model, name, tensors), config.doubled_rank()
    peft_config = config.to_peft_dict(fan_in_fan_out=_fan_in_fan_out(model, name))
    text = json.dumps(peft_config, indent=2, sort_keys=True) + "\n"
    # The inner block's file is renamed first: the weights, then the config that describes them.
    with replacing(directory / CONFIG_NAME) as config_tmp, replacing(directory / WEIGHTS_NAME) as weights_tmp:
        save_file(tensors, weights_tmp, metadata={"format": "pt"})
        config_tmp.write_text(text)
    return directory


def initial_adapter(model: nn.Module, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The saved tensors of a PiSSA/OLoRA adapter converted for the original base:
    A' = [A; A₀] (2r, in), B' = [B | -B₀] (out, 2r), so scale · B' A' = scale · (B A - B₀ A₀).
    Embedding adapters (which start the default way) get zero rows and columns up to rank 2r."""
    out = dict(tensors)
    for module_name, layer in lora_layers(model):
        if name not in layer.rank:
            continue
        prefix = PREFIX + module_name + "."
        if isinstance(layer, LoraEmbedding):
            a, b = out[prefix + "lora_embedding_A"], out[prefix + "lora_embedding_B"]
            out[prefix + "lora_embedding_A"] = torch.cat([a, torch.zeros_like(a)], dim=0)
            out[prefix + "lora_embedding_B"] = torch.cat([b, torch.zeros_like(b)], dim=1)
            continue
        a0, b0 = layer.initial_adapters[name]
        a, b = out[prefix + "lora_A.weight"], out[prefix + "lora_B.weight"]
        out[prefix + "lora_A.weight"] = torch.cat([a, a0.to(a.dtype)], dim=0)
        out[prefix + "lora_B.weight"] = torch.cat([b, -b0.to(b.dtype)], dim=1)
    return out


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; an adapter directory holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    raw = read_json_object(path)
    _refuse_runaway_patterns(path, raw)
    if raw.get("alora_invocation_tokens"):
        # aLoRA applies ΔW only from the invocation tokens on; read as plain LoRA it would change
        # every position, so the logits would silently differ from peft's.
        raise ConfigError(CONFIG_NAME, [f"alora_invocation_tokens={raw['alora_invocation_tokens']!r}: activated "
                                        "LoRA (aLoRA) is not supported by lorakit (only plain LoRA)"])
    return LoraConfig.from_peft_dict(raw)


def _refuse_runaway_patterns(path: Path, raw: dict) -> None:
    """Module-name regexes in an adapter config that could backtrack without end (patterns.py)."""
    patterns = [(key, raw[key]) for key in ("target_modules", "exclude_modules") if isinstance(raw.get(key), str)]
    for key in ("rank_pattern", "alpha_pattern"):
        if isinstance(raw.get(key), dict):  # each key is matched as (.*\.)?(key)$
            patterns += [(f"{key} key", k) for k in raw[key] if isinstance(k, str)]
    problems = [f"{key}: {problem}" for key, value in patterns if (problem := pattern_problem(value))]
    if problems:
        raise ConfigError(str(path), problems)


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not os.path.lexists(path):
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(
                f"{directory / 'adapter_model.bin'} is a pickle file, which can run arbitrary code "
                f"when loaded; lorakit never unpickles. Convert it where you trust its origin, e.g. "
                f"`PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)`")
        raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME} in the adapter directory")
    with open_safetensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    problems = [f"tensor name {k!r} is not a module path (dot-separated names)" for k in tensors
                if not re.fullmatch(r"[\w\-]+(\.[\w\-]+)*", k)]
    problems += [f"{k} is {t.dtype}, not a floating-point tensor (a quantized or corrupted adapter?)"
                 for k, t in tensors.items() if not t.is_floating_point()]
    problems += [f"{k} holds NaN or infinite values" for k, t in tensors.items()
                 if t.is_floating_point() and not torch.isfinite(t).all()]
    if problems:
        raise ValueError(f"{describe(path)}: not a usable adapter:{_listed(problems)}")
    return tensors


def _listed(problems: list[str], most: int = 8) -> str:
    """The first `most` problems, one per indented line, and how many there are in all."""
    shown = problems[:most] + ([f"... ({len(problems)} problems in all)"] if len(problems) > most else [])
    return "".join(f"\n  {p}" for p in shown)


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = "default") -> nn.Module:
    """Add the adapter saved in `directory` (by lorakit or PEFT) to `model` as `name`.

    Strict: every tensor the adapter needs must be in the file, every tensor in the file must
    belong to the model, and shapes must agree; otherwise ValueError names them and the model is
    left unchanged.
    """
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    add_lora(model, config, name)
    try:
        copy_into(model, name, tensors, directory)
    except BaseException:
        delete_adapter(model, name)
        raise
    return model


def copy_into(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], directory) -> None:
    """Copy an adapter's saved tensors (PEFT's keys) into the model's adapter `name`, strictly:
    missing or unexpected keys and shape mismatches are a ValueError naming `directory`, raised
    before anything is copied."""
    expected = adapter_state_dict(model, name)
    # PEFT also saves the base weight of an adapted embedding (save_embedding_layers): accept it.
    optional = {PREFIX + n + ".base_layer.weight": m.base_layer.weight
                for n, m in lora_layers(model) if isinstance(m, LoraEmbedding) and name in m.rank}
    known = {**optional, **expected}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(known))
    wrong = sorted(f"{k}: file {tuple(t.shape)} vs model {tuple(known[k].shape)}"
                   for k, t in tensors.items() if k in known and t.shape != known[k].shape)
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"adapter in {directory} does not fit this model (was it made for another base "
                         "model?):\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for key, t in tensors.items():
            known[key].copy_(t.to(known[key].dtype))


def adapter_report(directory: str | os.PathLike) -> dict:
    """Config, parameter count, bytes on disk and per-module norms of a saved adapter."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    modules, problems = [], []
    for key in sorted(tensors):
        for a_suffix, b_suffix in ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")):
            b_key = key[:-len(a_suffix)] + b_suffix
            if key.endswith(b_suffix) and key[:-len(b_suffix)] + a_suffix not in tensors:
                problems.append(f"{key} has no {a_suffix[1:]} partner")
            if not key.endswith(a_suffix):
                continue
            if b_key not in tensors:
                problems.append(f"{key} has no {b_suffix[1:]} partner")
                continue
            module = key[len(PREFIX):-len(a_suffix)] if key.startswith(PREFIX) else key[:-len(a_suffix)]
            a, b = tensors[key].float(), tensors[b_key].float()  # A: (r, in), B: (out, r)
            r, _ = config.rank_and_alpha(module)
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                problems.append(f"{module}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) and (out, r) "
                                "with one rank")
            elif a.shape[0] != r and not (config.target_parameters and a.shape[0] % r == 0):
                problems.append(f"{module}: the tensors have rank {a.shape[0]} but {CONFIG_NAME} gives r={r} "
                                "(r, or its rank_pattern entry), so the scale alpha/r would be wrong")
            else:
                # target_parameters: E experts, each its own rank-r update (layer.LoraParameter)
                experts = a.shape[0] // r
                scale = config.scaling(module)
                delta = b @ a if experts == 1 else torch.bmm(b.reshape(b.shape[0], r, experts).permute(2, 0, 1),
                                                             a.reshape(experts, r, a.shape[1]))  # (E, out, in)
                modules.append({"module": module, "r": r, "scale": scale,
                                **({"experts": experts} if experts > 1 else {}),
                                "norm_A": a.norm().item(), "norm_B": b.norm().item(),
                                "norm_delta": scale * delta.norm().item()})
    if problems:
        raise ValueError(f"adapter in {directory} is inconsistent:{_listed(problems)}")
    files = [directory / CONFIG_NAME, directory / WEIGHTS_NAME]
    magnitudes = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    return {
        "variant": "dora" if config.dora else "lora",
        "init": config.init + (f" (randomized SVD, {config.pissa_niter} iterations)" if config.pissa_niter is not None
                               else f" ({config.loftq_iters} iterations)" if config.init == "loftq" else ""),
        "magnitude_vectors": len(magnitudes),
        "config": json.loads((directory / CONFIG_NAME).read_text()),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": sum(f.stat().st_size for f in files),
        "modules": modules,
    }
