"""Module surgery: finding a model's modules by name and swapping one for another in place.

Injection (add_lora), the memory planner, NF4 quantization and the checkpoint loader all address
modules by their full names ("model.layers.0.self_attn.q_proj") and rebuild the model by
replacing a module in its parent. The rules for that live here, once:

- a target spec is a list of names, a module matching when its full name equals an entry or ends
  in "." + entry (peft's rule: "q_proj" matches every layer's q_proj), or a regex string that
  must match the full name entirely (matches);
- a module's block index is the number after a layers container ("layers.3." -> 3) (layer_index);
- the output head is the module the model returns from get_output_embeddings (output_head_names);
- a LoRA wrapper stands for the layer it wraps when a model is searched (unwrapped_modules).

This module sits low in the import order: it knows the wrappers of layer.py and nothing above.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

from .layer import LoraLayer, LoraParameter, ModulesToSave

# Names of the container holding a model's blocks: Llama "layers", GPT-2 "h", others "blocks", BERT "layer".
DEFAULT_LAYERS_PATTERNS = ("layers", "h", "blocks", "layer")


def matches(spec: list[str] | tuple[str, ...] | str, name: str) -> bool:
    """Whether the module called `name` (a full name) is one `spec` selects.

    spec: a list of names, matched when `name` equals an entry or ends with "." + entry (so
    "q_proj" selects "model.layers.0.self_attn.q_proj" but not "model.layers.0.self_attn.qq_proj");
    or a string, a regular expression that must match the whole of `name` (re.fullmatch).
    """
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in spec)


def layer_index(name: str, patterns: str | list[str] | tuple[str, ...] | None = None) -> int | None:
    """The block index in a module's full name: 3 for "model.layers.3.mlp.up_proj", found after the
    first of `patterns` (a container name, or several; default DEFAULT_LAYERS_PATTERNS) that occurs
    as a whole name part followed by a number; None when there is none (embeddings, head)."""
    patterns = [patterns] if isinstance(patterns, str) else (patterns or DEFAULT_LAYERS_PATTERNS)
    for pattern in patterns:
        found = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def expert_parameters(model: nn.Module) -> list[tuple[str, str]]:
    """(module name, parameter name) of every mixture-of-experts weight: a parameter of 3 or more
    dimensions whose first is the module's `num_experts`, e.g. Mixtral's `mlp.experts.gate_up_proj`
    (E, 2 * intermediate, hidden) in transformers 5, which stores all experts of a layer as one
    tensor instead of E nn.Linear modules. Biases (E, out) are 2-D and not listed. A parameter
    already NF4 (a parametrization, nf4.NF4Weight) is listed under its name too; quantize them with
    nf4.quantize_parameter_."""
    out = []
    for name, module in unwrapped_modules(model):
        experts = getattr(module, "num_experts", None)
        if not isinstance(experts, int):
            continue
        shapes = {leaf: tuple(p.shape) for leaf, p in module.named_parameters(recurse=False)}
        for leaf, plist in getattr(module, "parametrizations", {}).items():  # NF4 already: its shape
            shapes[leaf] = tuple(getattr(plist[0], "shape", None) or getattr(module, leaf).shape)
        out += [(name, leaf) for leaf, shape in shapes.items() if len(shape) >= 3 and shape[0] == experts]
    return out


def registration_order(module: nn.Module, config=None) -> list[str]:
    """The names of `module`'s own parameters, parametrized ones (NF4, LoRA) included, in the order
    its class registers them (Mixtral's experts: gate_up_proj, down_proj), which is the order peft
    nests its wrappers in (adapter_io). Parametrizing a parameter loses its place, so the order of
    a module with parametrizations is read from a copy built on the meta device from `config`
    (transformers' modules take the model's config); a module that cannot be built so keeps its
    parametrized parameters first, in the order they were parametrized."""
    names = list(getattr(module, "parametrizations", {})) + [n for n, _ in module.named_parameters(recurse=False)]
    if len(names) == len([n for n, _ in module.named_parameters(recurse=False)]):
        return names
    try:
        with torch.device("meta"):
            fresh = type(module)(config)
        order = [n for n, _ in fresh.named_parameters(recurse=False)]
    except Exception:  # any constructor: the order is a preference, never a reason to fail
        order = []
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order) + names.index(n))


def unwrapped_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(full name, module) for every module of `model` (the model itself first, named ""), as
    named_modules() gives them, except that a LoRA wrapper stands for the layer it wraps: it is
    listed under its own name with the wrapped layer (LoraLayer.base_layer,
    ModulesToSave.original_module) as module, and nothing inside it is listed; a LoRA
    parametrization (LoraParameter, target_parameters) is not listed either. So a model with
    adapters is searched as the base model it was built from."""
    for name, module, _ in _walk(model):
        yield name, module


def output_head_names(model: nn.Module) -> set[str]:
    """The full names of the model's output head, the module get_output_embeddings() returns,
    wrapped by an adapter or not (several names when it is reachable by several); {"lm_head"}
    for a model that does not say."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    names = {name for name, base, wrapper in _walk(model) if head is not None and head in (base, wrapper)}
    return names or {"lm_head"}


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """(full name, module with LoRA wrappers taken off, module as it is in the model)."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and name.startswith(inside):
            continue
        base = module
        if isinstance(module, LoraParameter):  # LoRA on a parameter: its A and B are no model layers
            inside += (name + ".",)
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside += (name + ".",)
            base = module.base_layer if isinstance(module, LoraLayer) else module.original_module
        yield name, base, module


def parent(model: nn.Module, full_name: str) -> tuple[nn.Module, str]:
    """(the module holding `full_name`, its attribute name there): (model.model.layers[0].self_attn,
    "q_proj") for "model.layers.0.self_attn.q_proj"; (model, name) for a top-level child."""
    parent_name, _, attr = full_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, full_name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the module called `full_name` is, in place; returns the module replaced."""
    holder, attr = parent(model, full_name)
    old = getattr(holder, attr)
    setattr(holder, attr, new)
    return old
