"""The shapes of a decoder-only transformer: all the planner knows about a model.

An `Architecture` holds the sizes of a Hugging Face config.json (no weights) and counts parameters.
`arch_from_config` reads one from a config (a dict, a config.json, a model directory), checking
every size first, and measures its parameters on the model transformers builds from that config on
the meta device (`measure`: no memory, no weights), so any causal LM transformers can build gets a
plan, its attention / MLP / expert shapes as they really are (`Measured`). The presets (presets.py)
carry no measurement: their counts come from the hand-written formulas below, which equal the
measured ones for the families they describe. `targeted_modules` says which linear modules of a
layer a LoRA target spec selects, with the one matching rule of `lorakit.surgery.matches`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..attention import MODEL_TYPES as SEGMENT_ATTENTION_MODEL_TYPES
from ..files import read_json_object
from ..loss import CHUNKED_LOSS_MODEL_TYPES
from ..patterns import pattern_problem
from ..surgery import matches

# The families the hand-written formulas describe (presets); arch_from_config plans any causal LM.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3")
DEFAULT_TARGETS = ("q_proj", "v_proj")  # what targets=None selects (the LoRA paper's W_q and W_v)
ALL_LINEAR = "all-linear"


@dataclass(frozen=True)
class Measured:
    """Parameter counts of a model as transformers builds it (measure()): what the formulas of
    Architecture would otherwise estimate from the config's sizes.

    layers_prefix:   the decoder blocks' container ("model.layers", GPT-2's "transformer.h")
    linears:         (name inside a block, in, out) of the first block's linear layers (nn.Linear,
                     Conv1D): what all-linear adapts and QLoRA stores in NF4
    layer:           every parameter of the first block
    experts:         its mixture-of-experts weights (surgery.expert_parameters; in NF4 under QLoRA)
    largest_expert:  the largest such tensor (E, out, in), in elements
    total:           every parameter of the model (tied weights once)
    norms:           normalisation modules in a block
    parameters:      (name inside a block, shape) of the first block's 2-D and 3-D parameters: what
                     lora.target_parameters can adapt (mixture-of-experts weights (E, out, in))
    gated_mlp:       its MLP is one gated_mlp recognises (down(act(gate(x)) ⊙ up(x)))
    """

    layers_prefix: str
    linears: tuple[tuple[str, int, int], ...]
    layer: int
    experts: int
    largest_expert: int
    total: int
    norms: int
    parameters: tuple[tuple[str, tuple[int, ...]], ...] = ()
    gated_mlp: bool = False


@dataclass(frozen=True)
class Architecture:
    """The shapes of a decoder-only transformer, as in its Hugging Face config.json."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    num_experts: int = 0  # 0: dense MLP; else a mixture of experts of intermediate_size each
    experts_per_token: int = 0
    attention_bias: bool = False  # biases on q/k/v (Qwen2)
    fused_projections: bool = False  # qkv_proj and gate_up_proj (Phi-3)
    norms_per_layer: int = 2  # Gemma 2 has four RMSNorms per layer
    attention: str = "sdpa"  # "eager" materializes (b, nh, s, s) attention probabilities
    attn_softcap: bool = False  # tanh soft-capping of attention scores (Gemma 2)
    final_softcap: bool = False  # tanh soft-capping of the logits (Gemma 2)
    # lorakit computes the loss in chunks from the last hidden states (loss.py) for the families
    # whose logits are the plain head's output; otherwise the model's own logits are used
    chunked_loss: bool = True
    # packed and padding-free rows attend example by example (lorakit.attention) in the families whose
    # attention goes through transformers' attention interface: no block mask, no repeated k and v
    segment_attention: bool = True
    hub_id: str = ""
    measured: Measured | None = None  # counts from the model itself; None: the formulas below

    @property
    def layers_prefix(self) -> str:
        return self.measured.layers_prefix if self.measured else "model.layers"

    @property
    def lean_mlp(self) -> bool:
        """Do adapters make its MLP keep gate(x) and up(x) only for backward (gated_mlp, switched
        on by add_lora)? A measured model: as transformers builds it; a preset: every dense MLP
        with separate gate and up projections (all the presets are gated)."""
        if self.measured:
            return self.measured.gated_mlp
        return not self.num_experts and not self.fused_projections

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_modules(self) -> list[tuple[str, int, int]]:
        """(name, in_features, out_features) of the nn.Linear modules of one decoder layer.

        MoE experts are 3-D parameters in transformers >= 5 (not nn.Linear), so they are not LoRA targets.
        """
        if self.measured:
            return list(self.measured.linears)
        h, inter, dq, dkv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        if self.fused_projections:
            attn = [("self_attn.qkv_proj", h, dq + 2 * dkv), ("self_attn.o_proj", dq, h)]
            mlp = [("mlp.gate_up_proj", h, 2 * inter), ("mlp.down_proj", inter, h)]
        else:
            attn = [("self_attn.q_proj", h, dq), ("self_attn.k_proj", h, dkv),
                    ("self_attn.v_proj", h, dkv), ("self_attn.o_proj", dq, h)]
            mlp = [("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter), ("mlp.down_proj", inter, h)]
        return attn + ([] if self.num_experts else mlp)

    def parameter_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of one decoder layer's 2-D and 3-D parameters, what lora.target_parameters
        selects from: the linears' weights (out, in), and Mixtral's router (E, h) and experts
        (transformers 5: mlp.experts.gate_up_proj (E, 2I, h), mlp.experts.down_proj (E, h, I))."""
        if self.measured:
            return list(self.measured.parameters)
        shapes = [(f"{n}.weight", (o, i)) for n, i, o in self.linear_modules()]
        if self.num_experts:
            e, h, inter = self.num_experts, self.hidden_size, self.intermediate_size
            shapes += [("mlp.gate.weight", (e, h)), ("mlp.experts.gate_up_proj", (e, 2 * inter, h)),
                       ("mlp.experts.down_proj", (e, h, inter))]
        return shapes

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: linears (+ q/k/v biases), experts and router, norms."""
        if self.measured:
            return self.measured.layer
        n = sum(i * o for _, i, o in self.linear_modules())
        if self.attention_bias:
            n += self.q_dim + 2 * self.kv_dim
        if self.num_experts:
            n += self.num_experts * 3 * self.hidden_size * self.intermediate_size  # gate, up, down
            n += self.num_experts * self.hidden_size  # router
        return n + self.norms_per_layer * self.hidden_size

    def quantizable_layer_parameters(self) -> int:
        """Parameters of one layer that QLoRA stores in NF4: linear weights and expert weights."""
        n = sum(i * o for _, i, o in self.linear_modules())
        if self.measured:
            return n + self.measured.experts
        if self.num_experts:
            n += self.num_experts * 3 * self.hidden_size * self.intermediate_size
        return n

    def largest_expert_weight(self) -> int:
        """Elements of a layer's largest expert tensor (Mixtral: gate_up_proj, E x 2I x h)."""
        if self.measured:
            return self.measured.largest_expert
        return 2 * self.num_experts * self.hidden_size * self.intermediate_size

    def embedding_parameters(self) -> int:
        """Input embedding plus the untied lm_head (measured: everything outside the blocks but the
        final norm's h, so that num_parameters() is the model's count)."""
        if self.measured:
            return self.measured.total - self.num_layers * self.measured.layer - self.hidden_size
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def num_parameters(self) -> int:
        return self.embedding_parameters() + self.num_layers * self.layer_parameters() + self.hidden_size


def targeted_modules(arch: Architecture, targets) -> list[tuple[str, int, int]]:
    """The linear modules of one layer that LoRA wraps (the planner takes every layer to be the same).

    targets: None (q_proj and v_proj), "all-linear" (every linear in the blocks; lm_head excluded, as in
    peft), a sequence of names or a regex string, matched by `surgery.matches` against full names like
    "model.layers.0.self_attn.q_proj" (a module matching in any layer counts in every layer).
    """
    chosen = _targeted_modules(arch, tuple(targets) if isinstance(targets, list) else targets)
    if not chosen:
        names = ", ".join(n.split(".")[-1] for n, _, _ in arch.linear_modules())
        raise ValueError(f"targets {DEFAULT_TARGETS if targets is None else targets!r} match no linear module "
                         f"of {arch.name}; its linear modules: {names} (or 'all-linear')")
    return list(chosen)


def targeted_parameters(arch: Architecture, target_parameters) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of the parameters of one layer that lora.target_parameters adapts (layer.
    LoraParameter): a list of names matched by `surgery.matches` against full names like
    "model.layers.0.mlp.experts.gate_up_proj" (peft's rule; a parameter matching in any layer counts
    in every layer). None or empty: none."""
    if not target_parameters:
        return []
    chosen = _targeted_parameters(arch, tuple(target_parameters))
    if not chosen:
        names = ", ".join(n for n, shape in arch.parameter_shapes() if len(shape) == 3) or "none"
        raise ValueError(f"target_parameters {list(target_parameters)!r} match no parameter of {arch.name}; "
                         f"its mixture-of-experts parameters: {names}")
    return list(chosen)


@functools.lru_cache(maxsize=256)
def _targeted_parameters(arch: Architecture, target_parameters: tuple[str, ...]) -> tuple:
    prefix = arch.layers_prefix
    return tuple(p for p in arch.parameter_shapes()
                 if any(matches(target_parameters, f"{prefix}.{i}.{p[0]}") for i in range(arch.num_layers)))


@functools.lru_cache(maxsize=256)  # a plan asks several times, and a name is matched in each of L layers
def _targeted_modules(arch: Architecture, targets) -> tuple[tuple[str, int, int], ...]:
    modules = arch.linear_modules()
    if targets is None:
        targets = DEFAULT_TARGETS
    if targets == ALL_LINEAR:
        return tuple(modules)
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets regex {targets!r} does not compile: {err}") from None
        problem = pattern_problem(targets)
        if problem:
            raise ValueError(f"targets regex {problem}")
    prefix = arch.layers_prefix
    return tuple(m for m in modules
                 if any(matches(targets, f"{prefix}.{i}.{m[0]}") for i in range(arch.num_layers)))


def arch_from_config(config: dict | str | os.PathLike, name: str | None = None) -> Architecture:
    """An Architecture from a Hugging Face config: a dict, a config.json path, or a model directory."""
    if not isinstance(config, dict):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"model config {str(path)!r} does not exist; pass a config.json or a directory "
                             "that holds one")
        name = name or path.parent.name
        config = read_json_object(path)
    c = config.get("text_config", config) if "hidden_size" not in config else config
    model_type = c.get("model_type", config.get("model_type", ""))
    if model_type in SUPPORTED_MODEL_TYPES:
        return _formula_arch(c, model_type, name)
    return _measured_arch(c, model_type, name)


def _formula_arch(c: dict, model_type: str, name: str | None) -> Architecture:
    """The six families the formulas describe, sized from the config (numbers pinned by tests)."""
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in c]
    if missing:
        raise ValueError(f"config of model_type {model_type!r} lacks {', '.join(missing)}")
    problems = config_value_problems(c)
    if problems:
        raise ValueError(f"config of model_type {model_type!r} is not a model the planner can size: "
                         + "; ".join(problems))
    h, heads = c["hidden_size"], c["num_attention_heads"]
    gemma = model_type == "gemma2"
    return Architecture(
        name=name or c.get("_name_or_path") or model_type,
        hidden_size=h,
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        head_dim=c.get("head_dim") or h // heads,
        vocab_size=c["vocab_size"],
        # transformers' defaults when the key is absent: Gemma ties, the others do not.
        tie_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        num_experts=c.get("num_local_experts", 0) if model_type == "mixtral" else 0,
        experts_per_token=c.get("num_experts_per_tok", 0) if model_type == "mixtral" else 0,
        attention_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
        fused_projections=model_type == "phi3",
        norms_per_layer=4 if gemma else 2,
        attention="eager" if gemma else "sdpa",
        attn_softcap=gemma and c.get("attn_logit_softcapping") is not None,
        final_softcap=gemma and c.get("final_logit_softcapping") is not None,
        chunked_loss=model_type in CHUNKED_LOSS_MODEL_TYPES,
        segment_attention=model_type in SEGMENT_ATTENTION_MODEL_TYPES,
    )


def _measured_arch(c: dict, model_type: str, name: str | None) -> Architecture:
    """Any other causal LM: its config read by transformers, its parameters measured on the model
    transformers builds from it; the sizes the activation formulas need from the config."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    known = ", ".join(SUPPORTED_MODEL_TYPES)
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        why = ("it is an encoder (transformers builds it as a masked LM)" if model_type in CONFIG_MAPPING
               else "transformers has no causal LM of that type")
        raise ValueError(f"model_type {model_type!r} is not supported by the planner: {why}; the planner sizes "
                         f"decoder-only causal LMs: {known}, and any other transformers builds "
                         "(gpt2, gpt_neox, qwen3, gemma3_text, qwen3_moe, gpt_oss, ...)")
    problems = config_value_problems(c, required=False)
    if problems:
        raise ValueError(f"config of model_type {model_type!r} is not a model the planner can size: "
                         + "; ".join(problems))
    config = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in c.items() if k != "model_type"})
    measured = measure(config)
    h, heads = config.hidden_size, config.num_attention_heads
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    inter = (getattr(config, "moe_intermediate_size", None) if experts else None) or \
        getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or \
        getattr(config, "ffn_hidden_size", None) or 4 * h
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Architecture(
        name=name or c.get("_name_or_path") or model_type,
        hidden_size=h,
        intermediate_size=inter,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=getattr(config, "head_dim", None) or h // heads,
        vocab_size=config.vocab_size,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        num_experts=experts,
        experts_per_token=getattr(config, "num_experts_per_tok", 0) if experts else 0,
        norms_per_layer=measured.norms,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) is not None,
        final_softcap=getattr(config, "final_logit_softcapping", None) is not None,
        chunked_loss=model_type in CHUNKED_LOSS_MODEL_TYPES,
        segment_attention=model_type in SEGMENT_ATTENTION_MODEL_TYPES,
        measured=measured,
    )


def measure(config) -> Measured:
    """Parameter counts of the causal LM transformers builds from `config` (a transformers
    config), built on the meta device: shapes only, no memory, no weights. Cached by config."""
    return _measure_cached(config.model_type, json.dumps(config.to_dict(), sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)  # a plan asks several times; building a large model's skeleton takes a while
def _measure_cached(model_type: str, config_json: str) -> Measured:
    from transformers import CONFIG_MAPPING

    return _measure(CONFIG_MAPPING[model_type].from_dict(json.loads(config_json)))


def _measure(config) -> Measured:
    import torch
    from transformers import AutoModelForCausalLM

    from ..gated_mlp import is_gated_mlp
    from ..nf4 import is_full_precision_linear
    from ..surgery import expert_parameters, layer_index

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    blocks = [(n, m) for n, m in model.named_modules()
              if layer_index(n) == 0 and n.rsplit(".", 1)[-1] == "0" and len(list(m.parameters())) > 0]
    if not blocks:
        raise ValueError(f"model_type {config.model_type!r}: found no decoder blocks (a container named "
                         "layers, h, blocks or layer) in the model transformers builds")
    block_name, block = blocks[0]
    prefix = block_name.rsplit(".", 1)[0]
    linears = tuple((n, m.weight.shape[0], m.weight.shape[1]) if type(m).__name__ == "Conv1D"
                    else (n, m.in_features, m.out_features)
                    for n, m in block.named_modules() if is_full_precision_linear(m))
    experts = [block.get_submodule(m).get_parameter(leaf) for m, leaf in expert_parameters(block)]
    return Measured(
        layers_prefix=prefix,
        linears=linears,
        layer=sum(p.numel() for p in block.parameters()),
        experts=sum(p.numel() for p in experts),
        largest_expert=max((p.numel() for p in experts), default=0),
        total=sum(p.numel() for p in model.parameters()),
        norms=sum(1 for m in block.modules() if "norm" in type(m).__name__.lower()),
        parameters=tuple((n, tuple(p.shape)) for n, p in block.named_parameters() if p.dim() in (2, 3)),
        gated_mlp=any(is_gated_mlp(m) for m in block.modules()),
    )


# Sane ranges of a config's sizes, far beyond any released model (Llama 3.1 405B: hidden 16,384,
# 126 layers, 128 heads, vocab 128,256) and small enough that a plan's arithmetic stays instant.
CONFIG_RANGES = {
    "hidden_size": (1, 1 << 20),
    "intermediate_size": (1, 1 << 22),
    "num_hidden_layers": (1, 10_000),
    "num_attention_heads": (1, 1 << 16),
    "num_key_value_heads": (1, 1 << 16),
    "head_dim": (1, 1 << 16),
    "vocab_size": (1, 1 << 24),
    "num_local_experts": (0, 1 << 16),
    "num_experts_per_tok": (0, 1 << 16),
}


def config_value_problems(c: dict, required: bool = True) -> list[str]:
    """Every size in config dict `c` that is not an integer in its CONFIG_RANGES range (absent
    optional keys and nulls are fine), and head counts that do not divide (checked when the
    config names them directly, which `required` says it must)."""
    problems = []
    for key, (lo, hi) in CONFIG_RANGES.items():
        value = c.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{key}={value!r} must be an integer, not a {type(value).__name__}")
        elif not lo <= value <= hi:
            problems.append(f"{key}={value!r} must be in [{lo:,}, {hi:,}]")
    if problems or (not required and not {"num_attention_heads", "hidden_size"} <= c.keys()):
        return problems
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if heads % kv:
        problems.append(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")
    if not c.get("head_dim") and c["hidden_size"] % heads:
        problems.append(f"hidden_size={c['hidden_size']} must be a multiple of num_attention_heads={heads} "
                        "(or give head_dim)")
    return problems
