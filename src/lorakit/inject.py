"""Putting LoRA adapters into a model and taking them out again.

add_lora wraps the targeted layers in place; merge / unmerge fold ΔW in and out of the frozen
weights; merge_and_unload returns a plain model. Several named adapters may live on one model:
set_adapter picks the active (and trainable) ones, disable_adapters switches them off for a block,
combine_adapters builds a new adapter equal to a weighted sum of others.

What a config selects follows surgery.py's rules (matches, layer_index, output_head_names), and
wrappers go in and come out with surgery.replace_module; this module decides what to wrap.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import gated_mlp, lean, rms_norm
from .config import ALL_LINEAR, DEFAULT_TARGETS, LoraConfig
from .layer import LoraEmbedding, LoraLayer, LoraLinear, LoraParameter, ModulesToSave
from .nf4 import NF4Linear, NF4Weight, nf4_weights, quantize_parameter_
from .surgery import (
    expert_parameters,
    layer_index,
    matches,
    output_head_names,
    registration_order,
    replace_module,
    unwrapped_modules,
)


def _is_4bit(module: nn.Module) -> bool:
    return isinstance(module, NF4Linear)


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or _is_4bit(module)


def _linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers ("q_proj", ...), for error messages."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in unwrapped_modules(model) if _is_linear(m)})


_first_adapter_hooks: list[Callable[[nn.Module], None]] = []


def when_first_adapter_added(hook: Callable[[nn.Module], None]) -> None:
    """Call hook(model) whenever add_lora puts the first adapter on a model. Integrations above
    this module register here instead of being imported by it: hf_trainer.attach, which makes a
    transformers model's save_pretrained write PEFT adapters (registered when the lorakit package
    is imported, so before any add_lora can run)."""
    if hook not in _first_adapter_hooks:
        _first_adapter_hooks.append(hook)


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The LoraConfig of each adapter on the model, by name (empty when it has none)."""
    return model.__dict__.setdefault("lorakit_adapters", {})


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave | LoraParameter]:
    for module in model.modules():
        if isinstance(module, (LoraLayer, ModulesToSave, LoraParameter)):
            yield module


def parameter_adapters(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, LoraParameter]]:
    """(module name, module, parameter name, its LoraParameter) for every parameter carrying LoRA
    (target_parameters); within a module in the order its class registers them (LoraParameter.position)."""
    for module_name, module in model.named_modules():
        found = [(leaf, link) for leaf, chain in getattr(module, "parametrizations", {}).items()
                 for link in chain if isinstance(link, LoraParameter)]
        for leaf, link in sorted(found, key=lambda item: item[1].position):
            yield module_name, module, leaf, link


def _parameter_candidates(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(module name, parameter name, value) of every parameter of 2 or more dimensions that
    target_parameters could select, a parametrized one (NF4, LoRA) under its own name; the
    insides of LoRA wrappers and parametrizations are not searched."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, module in unwrapped_modules(model):
        if ".parametrizations." in f".{name}.":
            continue
        for leaf in registration_order(module, config):
            value = getattr(module, leaf)
            if value.dim() >= 2:
                yield name, leaf, value


def resolve_parameters(model: nn.Module, config: LoraConfig, modules: list[str] = ()) -> list[tuple[str, str]]:
    """(module name, parameter name) of each parameter `config.target_parameters` adapts, in model
    order (within a module: in the order peft nests its wrappers). An entry selects the parameter
    whose full name ("model.layers.0.mlp.experts.gate_up_proj") equals it or ends in "." + entry,
    peft's rule; exclude and layers apply to the module's name. `modules`: the modules LoRA wraps
    whole (targets), whose parameters may not be targeted as well."""
    if not config.target_parameters:
        return []
    chosen, problems = [], []
    for name, leaf, value in _parameter_candidates(model):
        if not matches(config.target_parameters, f"{name}.{leaf}"):
            continue
        if config.exclude is not None and matches(config.exclude, name):
            continue
        if config.layers is not None and layer_index(name, config.layers_pattern) not in config.layers:
            continue
        if name in modules:
            problems.append(f"{name}.{leaf} (its module {name} is a LoRA target too)")
        elif value.dim() > 3:
            problems.append(f"{name}.{leaf} ({value.dim()}-D; 2-D and 3-D parameters only)")
        else:
            chosen.append((name, leaf))
    if problems:
        raise ValueError(f"target_parameters {config.target_parameters!r} select parameters LoRA cannot adapt: "
                         + ", ".join(problems[:5]))
    if not chosen:
        shown = sorted({f"{module.rsplit('.', 1)[-1]}.{leaf}" for module, leaf in expert_parameters(model)})
        raise ValueError(f"target_parameters {config.target_parameters!r} match no parameter"
                         + (f" (with exclude={config.exclude!r}, layers={config.layers!r})"
                            if config.exclude or config.layers else "")
                         + f"; mixture-of-experts parameters here: {', '.join(shown) or 'none'}")
    return chosen


def parameter_list(model: nn.Module, chosen: list[tuple[str, str]]) -> list[str]:
    """A target_parameters list selecting exactly `chosen` by peft's rule alone (peft applies no
    exclude or layers to parameters): their last two names ("experts.gate_up_proj"), or the full
    names when those select more."""
    full = [f"{name}.{leaf}" for name, leaf in chosen]
    short = list(dict.fromkeys(".".join(f.split(".")[-2:]) for f in full))
    selected = [f"{n}.{leaf}" for n, leaf, _ in _parameter_candidates(model) if matches(short, f"{n}.{leaf}")]
    return short if sorted(selected) == sorted(full) else full


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    linear = _linear_names(model)
    raise ValueError(
        f"no default LoRA targets for model type {model_type!r} (known: {', '.join(sorted(DEFAULT_TARGETS))}); "
        f"pass LoraConfig(targets=[...]); linear modules here: {', '.join(linear) or 'none'}"
    )


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules `config` adapts, in model order. Errors name the candidates."""
    targets = config.targets if config.targets is not None else default_targets(model)
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    chosen, unsupported = [], []
    for name, module in unwrapped_modules(model):
        if not name:
            continue
        if targets == ALL_LINEAR:
            hit = _is_linear(module) and name not in heads
        else:
            hit = matches(targets, name)
        if not hit or (config.exclude is not None and matches(config.exclude, name)):
            continue
        if config.layers is not None and layer_index(name, config.layers_pattern) not in config.layers:
            continue
        if _is_linear(module) or isinstance(module, nn.Embedding):
            chosen.append(name)
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(
            f"targets {targets!r} match modules LoRA cannot adapt: {', '.join(unsupported[:5])}; "
            "supported: nn.Linear, transformers' Conv1D, nn.Embedding, lorakit's NF4Linear"
        )
    if not chosen:
        linear = _linear_names(model)
        raise ValueError(
            f"targets {targets!r} match no module"
            + (f" (with exclude={config.exclude!r}, layers={config.layers!r})" if config.exclude or config.layers else "")
            + f"; linear modules here: {', '.join(linear) or 'none'}"
        )
    return chosen


def target_list(model: nn.Module, config: LoraConfig, chosen: list[str]) -> list[str]:
    """A target list selecting exactly the modules `chosen` (full names, in model order), as peft
    writes lists: their distinct last names (["q_proj", "k_proj", ...]), or the full names when
    a last name also ends a module not chosen (e.g. a block's `out` and an output head `out`).
    Matched like any list (a name equal to an entry or ending in "." + entry), with the config's
    exclude and layers, by lorakit and peft alike."""
    names = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in chosen))
    try:
        if resolve_targets(model, config.replace(targets=names)) == chosen:
            return names
    except ValueError:  # a last name also ends a module LoRA cannot adapt
        pass
    return list(chosen)


def add_lora(model: nn.Module, config: LoraConfig | None = None, name: str = "default",
             adapter_dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Freeze `model` and add a LoRA adapter called `name` to the layers `config` targets.

    The first adapter becomes the active one; later ones are added inactive (use set_adapter).
    adapter_dtype: dtype of A and B (float32 by default, also on a bfloat16 base); None: the base's.
    The adapter's config (adapter_configs, save_adapter) names the modules it adapts: targets=None
    becomes the model type's defaults, "all-linear" the list of modules it selected (target_list).
    Returns the model, changed in place.
    """
    config = config or LoraConfig()
    configs = adapter_configs(model)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
        raise ValueError(f"adapter name {name!r}: use letters, digits, '_' and '-' only")
    if name in configs:
        raise ValueError(f"adapter {name!r} already exists (adapters: {', '.join(configs)}); "
                         "delete_adapter first or pick another name")
    _check_bias_scope(configs, name, config)
    if config.targets is None:
        config = config.replace(targets=default_targets(model))
    targets = resolve_targets(model, config) if config.targets != [] else []
    parameters = resolve_parameters(model, config, targets)
    _check_same_parameters(model, configs, parameters)
    if config.targets == ALL_LINEAR:
        _warn_experts_left_out(model, config, parameters)
        # Other tools resolve "all-linear" their own way (peft also wraps MoE routers and experts):
        # the adapter's config, and so its saved adapter_config.json, names what is adapted here.
        config = config.replace(targets=target_list(model, config, targets))
    if parameters:  # what peft selects from the saved list is exactly what is adapted here
        config = config.replace(target_parameters=parameter_list(model, parameters))
    to_save = _resolve_modules_to_save(model, config.modules_to_save)
    first = not configs
    if first:
        model.requires_grad_(False)

    for full_name in targets:
        module = model.get_submodule(full_name)
        if not isinstance(module, LoraLayer):
            module = LoraEmbedding(module) if isinstance(module, nn.Embedding) else LoraLinear(module)
            replace_module(model, full_name, module)
        r, _ = config.rank_and_alpha(full_name)
        weight = module.base_layer.weight
        dtype = adapter_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
        # a base still on the meta device (loaded later, part by part) gets its adapters on the
        # CPU, initialised now: the same values, in the same order, as on a loaded base
        device = torch.device("cpu") if weight.is_meta else weight.device
        module.add_adapter(name, r, config.scaling(full_name), config.dropout, config.init,
                           dtype=dtype, device=device, dora=config.dora, init_options=config.init_options())
        module.train(module.base_layer.training)  # new dropout modules follow the model's mode
        if first:
            module.active_adapters = [name]
    for i, (module_name, leaf) in enumerate(parameters):
        position = sum(m == module_name for m, _ in parameters[:i])  # its place in the module (peft's nesting)
        _add_parameter_adapter(model, module_name, leaf, name, config, adapter_dtype, first, position)
    for full_name in to_save:
        module = model.get_submodule(full_name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, full_name, module)
        module.add_adapter(name)
        if first:
            module.active_adapters = [name]

    configs[name] = config
    if first:
        set_adapter(model, name)
        gated_mlp.keep_less(model)  # the same gradients, two fewer (N, I) tensors kept per MLP
        rms_norm.make_lean(model)  # Llama-family norms: the same forward, a closed-form backward
        for hook in _first_adapter_hooks:  # hf_trainer: save_pretrained and Trainer write PEFT adapters
            hook(model)
    else:
        # Added inactive: its parameters do not train until set_adapter selects it.
        for p in _adapter_parameters(model, name):
            p.requires_grad_(False)
    return model


def _warn_experts_left_out(model: nn.Module, config: LoraConfig, parameters: list[tuple[str, str]]) -> None:
    """all-linear adapts linear layers; a mixture-of-experts model (transformers 5) holds its experts
    as 3-D parameters (surgery.expert_parameters): say how many are left out and how to add them."""
    left_out = [(module, leaf) for module, leaf in expert_parameters(model)
                if (module, leaf) not in parameters
                and (config.exclude is None or not matches(config.exclude, module))
                and (config.layers is None or layer_index(module, config.layers_pattern) in config.layers)]
    if left_out:
        listed = ", ".join(f"{m}.{leaf}" for m, leaf in left_out[:3]) + (", ..." if len(left_out) > 3 else "")
        example = list(dict.fromkeys(f"{m.rsplit('.', 1)[-1]}.{leaf}" for m, leaf in left_out))
        warnings.warn(f"all-linear adapts the linear layers only; {len(left_out)} mixture-of-experts weights are "
                      f"not adapted ({listed}); to adapt them too, set lora.target_parameters (LoraConfig("
                      f"target_parameters=...), peft's), e.g. {example}", stacklevel=3)


def _check_same_parameters(model: nn.Module, configs: dict[str, LoraConfig],
                           parameters: list[tuple[str, str]]) -> None:
    """All adapters with target_parameters adapt the same parameters (peft's rule: its nested
    wrappers, and so its file keys, depend on the set)."""
    present = sorted({(m, leaf) for m, _, leaf, _ in parameter_adapters(model)})
    if parameters and present and sorted(parameters) != present:
        raise ValueError(f"target_parameters: this adapter adapts {len(parameters)} parameters "
                         f"({parameters[0][0]}.{parameters[0][1]}, ...) but the model's other adapters adapt "
                         f"{len(present)} others ({present[0][0]}.{present[0][1]}, ...); all adapters with "
                         "target_parameters must adapt the same parameters (as in peft)")


def _add_parameter_adapter(model: nn.Module, module_name: str, leaf: str, name: str, config: LoraConfig,
                           adapter_dtype: torch.dtype | None, first: bool, position: int) -> None:
    """Adapter `name` on parameter `leaf` of module `module_name`: a LoraParameter at the end of
    the parameter's parametrizations (after NF4's dequantization, if any), created on first use."""
    from torch.nn.utils import parametrize

    module = model.get_submodule(module_name)
    chains = getattr(module, "parametrizations", {})
    lora = next((link for link in (chains[leaf] if leaf in chains else []) if isinstance(link, LoraParameter)), None)
    weight = getattr(module, leaf)
    if lora is None:
        lora = LoraParameter(weight.shape, transposed=bool(getattr(module, "is_transposed", False)), position=position)
        parametrize.register_parametrization(module, leaf, lora)
        _cache_during_forward(module)
    r, _ = config.rank_and_alpha(f"{module_name}.{leaf}")
    dtype = adapter_dtype or (weight.dtype if weight.is_floating_point() else torch.float32)
    device = torch.device("cpu") if weight.is_meta else weight.device
    lora.add_adapter(name, r, config.scaling(f"{module_name}.{leaf}"), config.init, dtype=dtype, device=device)
    if first:
        lora.active_adapters = [name]


def _check_bias_scope(configs: dict[str, LoraConfig], name: str, config: LoraConfig) -> None:
    """An adapter that trains biases must be the model's only adapter: biases are base weights,
    shared by every adapter, so training them cannot be scoped to one (peft refuses two such
    adapters; a second one with bias="none" would still run on, and train, the first one's biases)."""
    if not configs:
        return
    everyone = {**configs, name: config}
    trainer = next((n for n, c in everyone.items() if c.bias != "none"), None)
    if trainer is not None:
        raise ValueError(
            f"cannot add adapter {name!r}: adapter {trainer!r} trains biases (bias={everyone[trainer].bias!r}), "
            "which are base weights shared by every adapter, so it must be the model's only adapter; "
            "with several adapters use bias='none' for all of them")


def _resolve_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    if not names:
        return []
    found = [n for n, _ in unwrapped_modules(model) if n and matches(names, n)]
    missing = [s for s in names if not any(matches([s], f) for f in found)]
    if missing:
        top = sorted({n.rsplit(".", 1)[-1] for n, m in unwrapped_modules(model) if n and not list(m.children())})
        raise ValueError(f"modules_to_save {missing} match no module; leaf modules here: {', '.join(top)}")
    return found


def check_adapter_names(model: nn.Module, names: list[str]) -> None:
    """ValueError naming the adapters in `names` the model does not have, and those it has."""
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"no adapter named {', '.join(map(repr, unknown))}; "
                         f"adapters on this model: {', '.join(configs) or 'none'}")


def _adapter_parameters(model: nn.Module, name: str) -> Iterator[nn.Parameter]:
    for module in _wrappers(model):
        if isinstance(module, ModulesToSave):
            if name in module.modules_to_save:
                yield from module.modules_to_save[name].parameters()
            continue
        for store in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            container = getattr(module, store, None)
            if container is not None and name in container:
                item = container[name]
                yield from ([item] if isinstance(item, nn.Parameter) else item.parameters())


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make these adapters the active ones: they alone apply in forward and train."""
    names = [names] if isinstance(names, str) else list(names)
    check_adapter_names(model, names)
    _check_one_copy_each(model, names, "activate one of them (with adapters that do not hold it)")
    for module in _wrappers(model):
        module.active_adapters = [n for n in names if n in module.adapter_names()]
    for other in adapter_configs(model):
        for p in _adapter_parameters(model, other):
            p.requires_grad_(other in names)
    _set_bias_trainable(model, names)


def _check_one_copy_each(model: nn.Module, names: list[str], advice: str) -> None:
    """Refuse adapters that hold copies of the same modules_to_save layer: only one copy can
    compute the layer (the others would train without ever getting a gradient)."""
    for full_name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            holders = [n for n in names if n in module.modules_to_save]
            if len(holders) > 1:
                listed = ", ".join(map(repr, holders[:-1])) + f" and {holders[-1]!r}"
                raise ValueError(f"adapters {listed} both hold a trained copy of {full_name} (modules_to_save); "
                                 f"only one copy can apply: {advice}")


def _bias_parameters(model: nn.Module, mode: str) -> list[nn.Parameter]:
    """The base model's biases that bias mode `mode` trains. "all": every bias outside the adapters
    and the modules_to_save wrappers (a copy there trains in full anyway, its original stays
    frozen); "lora_only": the biases of the adapted layers; "none": none."""
    if mode == "lora_only":
        return [layer.base_layer.bias for _, layer in lora_layers(model)
                if isinstance(getattr(layer.base_layer, "bias", None), nn.Parameter)]
    if mode != "all":
        return []
    wrapped = {id(p) for m in model.modules() if isinstance(m, ModulesToSave) for p in m.parameters()}
    return [p for pname, p in model.named_parameters()
            if pname.rsplit(".", 1)[-1] == "bias" and ".lora_" not in pname and id(p) not in wrapped]


def _set_bias_trainable(model: nn.Module, names: list[str]) -> None:
    """A base bias trains exactly when the bias mode of an active adapter covers it."""
    configs = adapter_configs(model)
    trained = {id(p) for n in names for p in _bias_parameters(model, configs[n].bias)}
    for p in _bias_parameters(model, "all"):
        p.requires_grad_(id(p) in trained)


def active_adapters(model: nn.Module) -> list[str]:
    active = []
    for module in _wrappers(model):
        active += [n for n in module.active_adapters if n not in active]
    return active


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block no adapter applies (merged ones are unmerged for the block and merged back
    after), so the model computes as its base, unless an adapter trains biases: those are base
    weights changed in place, which a warning says (as peft does)."""
    for name, config in adapter_configs(model).items():
        if config.bias != "none":
            warnings.warn(f"adapter {name!r} trains the base model's biases (bias={config.bias!r}): training "
                          "changes them in place, so within disable_adapters the model does not compute as "
                          "its base", stacklevel=3)
    layers = list(_wrappers(model))
    merged = {id(m): list(m.merged_adapters) for m in layers if isinstance(m, LoraLayer)}
    merged_parameters = [(module, leaf, list(lora.merged_adapters))
                         for _, module, leaf, lora in parameter_adapters(model) if lora.merged_adapters]
    unmerge(model)
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        shared = _shared_weights(model)
        for m in layers:
            m.disabled = False
            if isinstance(m, LoraLayer) and merged.get(id(m)):
                m.merge(merged[id(m)], untie=id(m.base_layer.weight) in shared)
        for module, leaf, names in merged_parameters:
            _merge_parameter(module, leaf, names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; wrappers left with no adapter go back to their base.

    The other active adapters stay active. When `name` was the only active one, the first remaining
    adapter (in the order they were added) becomes active, with a warning, as in peft. Deleting the
    last adapter leaves the plain base model, all frozen (peft keeps its wrappers, none active).
    """
    check_adapter_names(model, [name])
    merged = [n for n, layer in lora_layers(model) if name in layer.merged_adapters]
    merged += [f"{n}.{leaf}" for n, _, leaf, lora in parameter_adapters(model) if name in lora.merged_adapters]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[0]}" + (f" and {len(merged) - 1} more layers"
                         if len(merged) > 1 else "") + "; unmerge(model) first")
    active = active_adapters(model)
    for module in list(_wrappers(model)):
        if name in module.adapter_names():
            module.delete_adapter(name)
    del adapter_configs(model)[name]
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    for full_name, module in wrappers:
        if not module.adapter_names():
            replace_module(model, full_name,
                           module.base_layer if isinstance(module, LoraLayer) else module.original_module)
    for _, module, leaf, lora in list(parameter_adapters(model)):
        if not lora.adapter_names():
            _remove_parameter_adapter(module, leaf, lora)
    configs = adapter_configs(model)
    still_active = [n for n in active if n != name]
    if name in active and not still_active and configs:
        still_active = [next(iter(configs))]
        warnings.warn(f"adapter {name!r} was active and is deleted; {still_active[0]!r} is active now",
                      stacklevel=2)
    if configs:
        set_adapter(model, still_active)
    else:
        _set_bias_trainable(model, [])  # no adapter left to train the biases


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable from more than one module (tied embeddings)."""
    counts = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {pid for pid, c in counts.items() if c > 1}


def merge(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Fold the active (or named) adapters into the frozen weights: W <- W + scale · B A.

    A weight shared with another module (tied input/output embeddings) is untied first, so the
    partner keeps its original values. Merging twice is a no-op.
    """
    if names is not None:
        check_adapter_names(model, names)
    shared = _shared_weights(model)
    for _, layer in lora_layers(model):
        if _is_4bit(layer.base_layer):
            raise ValueError("cannot merge into a 4-bit weight in place; use merge_and_unload(model), "
                             "which dequantizes and merges in float32")
        layer.merge(names and [n for n in names if n in layer.rank],
                    untie=id(layer.base_layer.weight) in shared)
    for module_name, module, leaf, lora in parameter_adapters(model):
        if len(module.parametrizations[leaf]) > 1:
            raise ValueError(f"cannot merge into {module_name}.{leaf} in place: it is stored in 4 bits "
                             "(nf4.NF4Weight); use merge_and_unload(model), which dequantizes and merges")
        _merge_parameter(module, leaf, names and [n for n in names if n in lora.rank] or lora.active_adapters)
    return model


def _merge_parameter(module: nn.Module, leaf: str, names: list[str]) -> None:
    """W <- W + ΔW (in float32) for each named adapter of parameter `leaf` not merged yet."""
    chain = module.parametrizations[leaf]
    lora = next(link for link in chain if isinstance(link, LoraParameter))
    names = [n for n in names if n not in lora.merged_adapters]
    if not names:
        return
    weight = chain.original
    with torch.no_grad():
        merged = weight.float()
        for name in names:
            merged += lora.delta_weight(name).float()
        weight.copy_(merged.to(weight.dtype))
    lora.merged_adapters += names


def _cache_during_forward(module: nn.Module) -> None:
    """Evaluate the module's parametrized weights once per forward (parametrize.cached), not at
    every access: experts' forwards read W[e] expert by expert, and each read would otherwise
    rebuild all of W + ΔW (and keep a copy for backward)."""
    from torch.nn.utils import parametrize

    if "lorakit_cache_hooks" in module.__dict__:
        return
    scope = contextlib.ExitStack()
    pre = module.register_forward_pre_hook(lambda m, args: scope.enter_context(parametrize.cached()))
    post = module.register_forward_hook(lambda m, args, out: scope.close(), always_call=True)
    module.__dict__["lorakit_cache_hooks"] = (pre, post)


def _stop_caching(module: nn.Module) -> None:
    for hook in module.__dict__.pop("lorakit_cache_hooks", ()):
        hook.remove()


def _unmerge_parameter(module: nn.Module, leaf: str, lora: LoraParameter) -> None:
    """W <- W - ΔW for every merged adapter of parameter `leaf`, the last merged first."""
    if not lora.merged_adapters:
        return
    weight = module.parametrizations[leaf].original
    with torch.no_grad():
        restored = weight.float()
        for name in reversed(lora.merged_adapters):
            restored -= lora.delta_weight(name).float()
        weight.copy_(restored.to(weight.dtype))
    lora.merged_adapters = []


def _remove_parameter_adapter(module: nn.Module, leaf: str, lora: LoraParameter,
                              dtype: torch.dtype | None = None, keep_value: bool = False) -> None:
    """Take `lora` out of the parameter's parametrizations. keep_value: the parameter becomes the
    value the chain computes now (W + ΔW of the live adapters, after dequantization if 4-bit),
    a plain frozen parameter in `dtype` (default: that value's)."""
    from torch.nn.utils import parametrize

    chain = module.parametrizations[leaf]
    if sum(isinstance(link, LoraParameter) for c in module.parametrizations.values() for link in c) == 1:
        _stop_caching(module)  # its last adapted parameter
    if keep_value:
        with torch.no_grad():
            value = getattr(module, leaf).detach().clone()
            parametrize.remove_parametrizations(module, leaf, leave_parametrized=True)
        delattr(module, leaf)  # a buffer when the chain held several tensors (NF4's codes)
        module.register_parameter(leaf, nn.Parameter(value.to(dtype or value.dtype), requires_grad=False))
    elif len(chain) == 1:
        _unmerge_parameter(module, leaf, lora)
        parametrize.remove_parametrizations(module, leaf, leave_parametrized=False)
    else:  # after NF4's dequantization: the 4-bit weight stays
        _unmerge_parameter(module, leaf, lora)
        del chain[[i for i, link in enumerate(chain) if link is lora][0]]


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge: W <- W - scale · B A (equal to the original to float tolerance; a weight untied
    by merge gets its shared original back exactly)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    for _, module, leaf, lora in parameter_adapters(model):
        _unmerge_parameter(module, leaf, lora)
    return model


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None, requantize: bool = False) -> nn.Module:
    """Merge the active adapters and return the plain model, with no lorakit module left.

    A 4-bit base weight is dequantized and merged in float32: W = deq(W_nf4) + scale · B A, stored
    as an nn.Linear (a Conv1D holding Wᵀ for GPT-2's layers) in `dtype` (default: the layer's
    compute dtype), exact up to that dtype's rounding. requantize=True stores W in NF4 again
    instead, which is lossy: the relative error ||deq(nf4(W)) - W|| / ||W|| of every layer is
    measured and reported in a warning.
    """
    shared = _shared_weights(model)
    untied = False
    errors = []
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLayer, ModulesToSave))]
    for full_name, module in wrappers:
        if isinstance(module, LoraLayer):
            if _is_4bit(module.base_layer):
                base = _merged_4bit(module, dtype, requantize, errors)
            else:
                tied = id(module.base_layer.weight) in shared
                module.merge(module.active_adapters, untie=tied)
                untied |= tied
                base = module.base_layer
            replace_module(model, full_name, base)
        else:
            replace_module(model, full_name, module.active_module())
    for _, module, leaf, lora in list(parameter_adapters(model)):
        # W + ΔW of the active adapters (merged ones are in W already); a 4-bit weight dequantized
        lora.active_adapters = [n for n in lora.active_adapters if n not in lora.merged_adapters]
        lora.merged_adapters = []
        nf4 = next((link for link in module.parametrizations[leaf] if isinstance(link, NF4Weight)), None)
        _remove_parameter_adapter(module, leaf, lora, dtype, keep_value=True)
        if requantize and nf4 is not None:  # back to NF4 with the same settings; lossy, measured
            merged = getattr(module, leaf).detach().float()
            quantize_parameter_(module, leaf, dtype or nf4.compute_dtype, nf4.double_quant, nf4.blocksize,
                                nf4.quant_type)
            errors.append((torch.linalg.vector_norm(getattr(module, leaf).float() - merged)
                           / torch.linalg.vector_norm(merged)).item())
    if untied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the merged copies now differ
    if errors:
        warnings.warn(f"merged {len(errors)} layers back into NF4: relative weight error "
                      f"mean {sum(errors) / len(errors):.4f}, max {max(errors):.4f} "
                      "(merge without requantize=True for an exact 16/32-bit model)", stacklevel=2)
    lean.restore(model)  # the lean MLPs and norms compute with their classes' forwards again
    model.__dict__.pop("lorakit_adapters", None)
    return model


def _merged_4bit(layer: LoraLinear, dtype: torch.dtype | None, requantize: bool,
                 errors: list[float]) -> nn.Module:
    q = layer.base_layer
    weight = q.dequantize_weight(torch.float32)  # (out, in), also for a Conv1D's weight
    for name in layer.active_adapters:
        weight = layer.merged_weight(name, weight)
    if requantize:
        plain = q.to_plain(weight, torch.float32)  # nn.Linear, or Conv1D for GPT-2: from_linear keeps the kind
        merged = NF4Linear.from_linear(plain, dtype or q.compute_dtype, q.weight_nested_absmax is not None,
                                       q.blocksize, q.quant_type)
        errors.append((torch.linalg.matrix_norm(merged.dequantize_weight(torch.float32) - weight)
                       / torch.linalg.matrix_norm(weight)).item())
        return merged
    return q.to_plain(weight, dtype)  # nn.Linear, or GPT-2's Conv1D with its (in, out) weight


def memory_report(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model, by kind: 4-bit base weights (NF4Linear layers and NF4Weight
    parametrizations, e.g. mixture-of-experts weights), their quantization constants (absmax,
    nested absmax, code tables), adapters (LoRA and modules_to_save copies), and the rest
    (embeddings, norms, unquantized layers)."""
    report = {"quantized_weights": 0, "quantization_constants": 0, "adapters": 0, "other": 0}
    seen = set()
    for state in nf4_weights(model).values():
        report["quantized_weights"] += state.packed.numel()
        report["quantization_constants"] += sum(t.numel() * t.element_size() for t in state.tensors()
                                                if t is not state.packed)
        seen.update(id(t) for t in state.tensors())
    adapter_ids = {id(p) for name in adapter_configs(model) for p in _adapter_parameters(model, name)}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        report["adapters" if id(t) in adapter_ids else "other"] += t.numel() * t.element_size()
    report["total"] = sum(report.values())
    return report


@dataclass
class TrainableReport:
    """Parameter counts: what trains, against the whole model and the weights LoRA adapts."""

    trainable: int
    total: int
    adapted: int  # parameters of the frozen weights that carry adapters
    per_module: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    @property
    def reduction(self) -> float:
        """How many times fewer parameters train than the adapted weights hold."""
        return self.adapted / self.trainable if self.trainable else float("inf")

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable: {self.percent:.4f}% || {self.reduction:.1f}x fewer than the adapted weights")


def _numel(module_or_param) -> int:
    """Logical parameter count; a 4-bit weight counts its unpacked elements."""
    if isinstance(module_or_param, torch.Tensor):
        return module_or_param.numel()
    return module_or_param.in_features * module_or_param.out_features


def trainable_parameters(model: nn.Module) -> TrainableReport:
    """What trains, against the whole model: `total` counts every weight, a 4-bit one (an NF4Linear's,
    an NF4 mixture-of-experts weight) by its unpacked elements, so QLoRA's total is the float model's."""
    per_module: dict[str, int] = {}
    trainable = total = 0
    for pname, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            owner = pname.rsplit(".", 2)[0] if ".lora_" not in pname else pname.split(".lora_")[0]
            # target_parameters: "<module>.parametrizations.<leaf>.<i>" -> "<module>.<leaf>"
            owner = re.sub(r"\.parametrizations\.(\w+)\.\d+$", r".\1", owner)
            per_module[owner] = per_module.get(owner, 0) + p.numel()
    total += sum(state.numel for state in nf4_weights(model).values())  # packed weights are buffers
    adapted = 0
    for _, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.active_adapters:
            base = module.base_layer
            adapted += _numel(base) if _is_4bit(base) else base.weight.numel()
    adapted += sum(lora.shape.numel() for _, _, _, lora in parameter_adapters(model) if lora.active_adapters)
    return TrainableReport(trainable, total, adapted, per_module)


def combine_adapters(model: nn.Module, weights: dict[str, float], name: str,
                     rank: int | None = None) -> nn.Module:
    """Add adapter `name` whose ΔW is exactly Σ_i w_i ΔW_i on every layer.

    Concatenating ranks makes this exact: B' = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...], A' = [A_1; A_2; ...],
    scale 1 (a zero block stands in where an adapter does not reach a layer). Combining A and B
    separately, as PEFT's "linear" mode does, adds cross terms B_i A_j. With `rank`, each layer's
    combined ΔW is compressed to its best rank-`rank` approximation (truncated SVD, Eckart–Young).

    A layer that adapter i trains in full (modules_to_save) gets its change weighted the same way:
    the new adapter's copy is M_0 + w_i (M_i - M_0), M_0 the frozen original (peft's
    add_weighted_adapter gives it a copy of M_0, losing what the layer learned). Adapters holding
    copies of the same such layer cannot be combined: only one copy can apply.
    """
    names = list(weights)
    check_adapter_names(model, names)
    _check_one_copy_each(model, names, "combine adapters of which at most one holds each such layer")
    if rank is not None and (not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank={rank!r}: must be an integer > 0, or None for exact concatenation")
    if any(True for _ in parameter_adapters(model)):
        raise ValueError("combine_adapters supports linear layers only; this model has adapters on parameters "
                         "(target_parameters)")
    if any(isinstance(m, LoraEmbedding) for _, m in lora_layers(model)):
        raise ValueError("combine_adapters supports linear layers only; this model has embedding adapters")
    dora = [n for n in names if adapter_configs(model)[n].dora]
    if dora:
        raise ValueError(f"combine_adapters: {', '.join(map(repr, dora))} are DoRA adapters, whose update "
                         "rescales the base weight (m / ||W + ΔW||): no sum of B A equals a sum of them; "
                         "combine plain LoRA adapters only")
    configs = adapter_configs(model)
    blocks = {}
    for full_name, layer in lora_layers(model):
        present = [n for n in names if n in layer.rank]
        if not present:
            continue
        a = torch.cat([layer.lora_A[n].weight.float() for n in present])               # (Σr, in)
        b = torch.cat([weights[n] * layer.scaling[n] * layer.lora_B[n].weight.float()  # (out, Σr)
                       for n in present], dim=1)
        if rank is not None:
            u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
            b, a = u[:, :rank] * s[:rank], vh[:rank]
        blocks[full_name] = (a, b)
    new_rank = rank or max(a.shape[0] for a, _ in blocks.values())
    held = {full_name: next(n for n in names if n in module.modules_to_save)  # its one holder
            for full_name, module in model.named_modules()
            if isinstance(module, ModulesToSave) and any(n in module.modules_to_save for n in names)}
    # Full module names as targets: the new adapter reaches exactly the layers its parts reach.
    first = configs[names[0]]
    add_lora(model, LoraConfig(r=new_rank, alpha=new_rank, targets=sorted(blocks),
                               modules_to_save=sorted(held) or None, task_type=first.task_type,
                               base_model=first.base_model), name)
    for full_name, holder in held.items():
        _weighted_copy(model.get_submodule(full_name), holder, weights[holder], name)
    for full_name, layer in lora_layers(model):
        if full_name in blocks:
            a, b = blocks[full_name]
            pad = new_rank - a.shape[0]  # zero rows of A / columns of B add nothing to ΔW
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(torch.cat([a, a.new_zeros(pad, a.shape[1])]))
                layer.lora_B[name].weight.copy_(torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1))
    return model


def _weighted_copy(wrapper: ModulesToSave, holder: str, weight: float, name: str) -> None:
    """Set copy `name` to M_0 + weight · (M_holder - M_0), tensor by tensor (M_0 the original);
    tensors that are not floating point (counters, indices) are taken from the holder."""
    original = wrapper.original_module.state_dict()
    trained = wrapper.modules_to_save[holder].state_dict()
    with torch.no_grad():
        for key, t in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
            if t.is_floating_point():
                m0 = original[key].float()
                t.copy_((m0 + weight * (trained[key].float() - m0)).to(t.dtype))
            else:
                t.copy_(trained[key])
