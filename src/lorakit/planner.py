"""Predict peak accelerator memory of one training step, and recommend full fine-tuning, LoRA or QLoRA.

Everything here is arithmetic over an `Architecture` (shapes only, no weights). The model is a list of
tensors that are alive at the same time, following what PyTorch autograd actually keeps for a Hugging
Face decoder (Llama, Mistral, Qwen2, Gemma 2, Phi-3, Mixtral) trained with `loss = model(...).loss;
loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`.

Notation (per micro-batch on one device): b batch, s sequence length, T = b*s tokens, h hidden size,
I MLP intermediate size, L layers, nh / nkv query / key-value heads, hd head dim, dq = nh*hd,
dkv = nkv*hd, V vocabulary, p bytes of the compute dtype (2 for bf16/fp16, 4 for fp32), a bytes of
the adapter dtype (4: adapters are kept in fp32, as peft does), r LoRA rank.

Components (bytes):
  base weights      full/LoRA: P*p.  QLoRA: every linear weight inside the blocks in NF4 (0.5 byte per
                    parameter); embeddings, norms and lm_head stay in the compute dtype (Dettmers et al.
                    2023, "QLoRA", section 2).
  quant constants   QLoRA: absmax per 64-weight block; with double quantization an 8-bit absmax plus one
                    fp32 constant per 256 blocks: 8/64 + 32/(64*256) bits per weight (0.127), without it
                    32/64 bits (0.5). Total with DQ: 4.127 bits per weight.
  adapter weights   r*(in + out) per targeted linear (A is r x in, B is out x r), times a bytes
                    (Hu et al. 2021, "LoRA"). For a 4096 x 4096 weight and r = 8: 65,536, 256x fewer.
  gradients         one per trainable parameter, in the trainable parameter's dtype.
  optimizer states  AdamW: two states (exp_avg, exp_avg_sq) in the parameter's dtype (torch.optim.AdamW
                    allocates them with zeros_like(param)); adamw8bit (bitsandbytes, blockwise, block
                    256): 2*(1 + 4/256) bytes, fp32 states for tensors under 4096 elements;
                    sgd (no momentum): none.
  activations       tensors saved for backward, counted from autograd's saved tensors (see
                    `layer_activation_bytes`). This is Korthikanti et al. 2022 ("Reducing Activation
                    Recomputation in Large Transformer Models", eq. 1: s*b*h*(34 + 5*a*s/h) for GPT) redone
                    for the Llama block as Hugging Face implements it: fp32 RMSNorm upcasts, gated MLP,
                    SDPA/flash attention (no s^2 term; saves q, k, v, output and a fp32 logsumexp) or eager
                    attention (saves fp32 softmax and the probabilities: the s^2 term).
                    With gradient checkpointing of every decoder layer (torch.utils.checkpoint, as
                    `model.gradient_checkpointing_enable()` does): L*T*h*p for the layer inputs, plus one
                    layer's full activations while it is recomputed in backward.
  logits and loss   lorakit's chunked cross-entropy (loss.py; Llama, Mistral, Qwen2, Phi-3): 8*C*V for
                    one chunk of C = 256 tokens, the hidden-state gradient p*T*h, and with a trained
                    head its float32 gradient and temporaries (see `logits_bytes`). Other families
                    (Gemma 2's soft-capping, Mixtral) use the model's logits, 12*T*V: cross-entropy in
                    fp32 keeps log_softmax's output (4TV); its backward holds that, the incoming
                    gradient (4TV) and its result (4TV) at once.
  transient         short-lived buffers: the gradients flowing through one layer's backward
                    (~p*T*(3I + 2h)), one dequantized weight per QLoRA matmul, and the optimizer step's
                    temporaries (foreach AdamW on CUDA: one copy of all states; per-tensor on CPU: two
                    copies of the largest tensor).
  runtime overhead  not seen by torch.cuda.max_memory_allocated: CUDA context (~0.5 GiB), caching-
                    allocator fragmentation (~5% of the allocated peak), NCCL buffers with FSDP.

The peak is the largest of four moments of a steady-state step (optimizer states already exist):
  backward start   weights + states + all activations + logits/loss
  layer backward   weights + states + lm_head grad + activations still needed + grads so far + transient
  backward end     weights + states + all grads (+ the tied embedding's second grad)
  optimizer step   weights + states + all grads + optimizer temporaries
With FSDP over N GPUs (full sharding) weights, grads and states are divided by N and two layers'
unsharded parameters (all-gather with prefetch) plus one layer's unsharded gradient are added.
Measured against real steps in bench/plan_vs_measured.py.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .loss import CHUNKED_LOSS_MODEL_TYPES, DEFAULT_CHUNK_SIZE
from .files import read_json_object
from .patterns import pattern_problem

GiB = 1024**3
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTENTIONS = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")
DEFAULT_TARGETS = ("q_proj", "v_proj")
# Common accelerator sizes in GiB (an "80 GB" A100 has 80 GiB), with examples.
GPUS: dict[int, str] = {
    16: "V100 16GB, T4, RTX 4080",
    24: "RTX 3090/4090, A10G, L4",
    40: "A100 40GB",
    48: "RTX A6000, L40S",
    80: "A100 80GB, H100",
    141: "H200",
}
CUDA_CONTEXT_BYTES = GiB // 2
FRAGMENTATION = 0.05
NCCL_BYTES = GiB // 2
DEFAULT_BUDGET_GIB = 24.0
MAX_BUDGET_GIB = 1 << 20  # a GiB budget above a petabyte per GPU is a typo
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "gemma2", "phi3")


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
    hub_id: str = ""

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
        h, inter, dq, dkv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        if self.fused_projections:
            attn = [("self_attn.qkv_proj", h, dq + 2 * dkv), ("self_attn.o_proj", dq, h)]
            mlp = [("mlp.gate_up_proj", h, 2 * inter), ("mlp.down_proj", inter, h)]
        else:
            attn = [("self_attn.q_proj", h, dq), ("self_attn.k_proj", h, dkv),
                    ("self_attn.v_proj", h, dkv), ("self_attn.o_proj", dq, h)]
            mlp = [("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter), ("mlp.down_proj", inter, h)]
        return attn + ([] if self.num_experts else mlp)

    def layer_parameters(self) -> int:
        """Parameters of one decoder layer: linears (+ q/k/v biases), experts and router, norms."""
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
        if self.num_experts:
            n += self.num_experts * 3 * self.hidden_size * self.intermediate_size
        return n

    def embedding_parameters(self) -> int:
        """Input embedding plus the untied lm_head."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2)

    def num_parameters(self) -> int:
        return self.embedding_parameters() + self.num_layers * self.layer_parameters() + self.hidden_size


@dataclass(frozen=True)
class PlanConfig:
    """What is trained and how. `batch_size` is the micro-batch per GPU."""

    method: str = "lora"
    rank: int = 8
    targets: tuple[str, ...] | str | None = None  # None: q_proj, v_proj; "all-linear"; names; a regex
    batch_size: int = 1
    seq_len: int = 2048
    grad_checkpointing: bool = False
    optimizer: str = "adamw"
    dtype: str = "bf16"
    n_gpus: int = 1
    lora_dropout: float = 0.0
    adapter_dtype: str = "fp32"
    double_quant: bool = True
    device: str = "cuda"  # "cpu" changes only the optimizer's temporaries and drops the CUDA overhead

    def validate(self) -> None:
        """Raise one ValueError that lists every invalid field, its value and the valid choices."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.adapter_dtype not in DTYPES:
            problems.append(f"adapter_dtype {self.adapter_dtype!r} is not one of {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            problems.append(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        for name, most in (("rank", 1 << 16), ("batch_size", 1 << 20), ("seq_len", 1 << 24), ("n_gpus", 1 << 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
            elif value > most:
                problems.append(f"{name} must be at most {most:,}, got {value:,}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if problems:
            raise ValueError("invalid plan configuration: " + "; ".join(problems))


@dataclass(frozen=True)
class Recommendation:
    method: str
    reason: str
    budget_gib: float
    peaks_gib: dict[str, float]  # predicted per-GPU peak (with overhead) of each method


@dataclass(frozen=True)
class Plan:
    arch: Architecture
    config: PlanConfig
    total_params: int
    trainable_params: int
    quantized_params: int
    components: dict[str, int]  # bytes of each component at its own maximum
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    phases: dict[str, int]  # bytes alive at each candidate peak moment
    peak_phase: str
    peak_allocated: int  # what torch.cuda.max_memory_allocated would report, per GPU
    runtime_overhead: int
    peak: int  # peak_allocated + runtime_overhead: what must fit on one GPU
    recommendation: Recommendation | None = None

    def to_dict(self) -> dict:
        """JSON-ready summary; byte counts are integers, sizes in GiB are rounded to 0.01."""
        fits_table = {
            str(gib): {str(n): fits(self, gib, n) for n in sorted({1, 2, 4, 8, self.config.n_gpus})}
            for gib in GPUS
        }
        cfg = asdict(self.config)
        cfg["targets"] = list(cfg["targets"]) if isinstance(cfg["targets"], tuple) else cfg["targets"]
        return {
            "schema_version": 1,
            "model": asdict(self.arch),
            "config": cfg,
            "parameters": {
                "total": self.total_params,
                "trainable": self.trainable_params,
                "quantized": self.quantized_params,
                "trainable_percent": round(100 * self.trainable_params / self.total_params, 4),
            },
            "components_bytes": dict(self.components),
            "activations_bytes": {
                "without_checkpointing": self.activations_without_checkpointing,
                "with_checkpointing": self.activations_with_checkpointing,
            },
            "phases_bytes": dict(self.phases),
            "peak_phase": self.peak_phase,
            "peak_allocated_bytes": self.peak_allocated,
            "runtime_overhead_bytes": self.runtime_overhead,
            "peak_bytes": self.peak,
            "peak_gib": round(self.peak / GiB, 2),
            "fits": fits_table,
            "recommendation": None if self.recommendation is None else asdict(self.recommendation),
        }


# ----------------------------------------------------------------------------------------------
# Models: presets, local config.json, hub ids


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
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {model_type!r} is not supported by the planner; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in c]
    if missing:
        raise ValueError(f"config of model_type {model_type!r} lacks {', '.join(missing)}")
    problems = _config_value_problems(c)
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


def _config_value_problems(c: dict) -> list[str]:
    """Every size in config dict `c` that is not an integer in its CONFIG_RANGES range (absent
    optional keys and nulls are fine)."""
    problems = []
    for key, (lo, hi) in CONFIG_RANGES.items():
        value = c.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            problems.append(f"{key}={value!r} must be an integer, not a {type(value).__name__}")
        elif not lo <= value <= hi:
            problems.append(f"{key}={value!r} must be in [{lo:,}, {hi:,}]")
    if problems:
        return problems
    heads, kv = c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"]
    if heads % kv:
        problems.append(f"num_attention_heads={heads} must be a multiple of num_key_value_heads={kv}")
    if not c.get("head_dim") and c["hidden_size"] % heads:
        problems.append(f"hidden_size={c['hidden_size']} must be a multiple of num_attention_heads={heads} "
                        "(or give head_dim)")
    return problems


def resolve_model(model: str | Architecture | dict) -> Architecture:
    """A preset name or hub id of a preset, a local directory / config.json, or a reachable hub id."""
    from lorakit.presets import PRESETS, find_preset

    if isinstance(model, Architecture):
        return model
    if isinstance(model, dict):
        return arch_from_config(model)
    preset = find_preset(model)
    if preset is not None:
        return preset
    if Path(model).exists():
        return arch_from_config(model)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        try:
            from huggingface_hub import hf_hub_download

            return arch_from_config(hf_hub_download(model, "config.json"), name=model)
        except Exception as err:  # offline, gated, missing: all mean "not reachable"
            reason = f"hub id {model!r} is not reachable ({type(err).__name__})"
    else:
        reason = f"{model!r} is neither a preset, an existing path nor a hub id"
    raise ValueError(f"model {reason}; presets: {', '.join(PRESETS)}")


# ----------------------------------------------------------------------------------------------
# Counting


def targeted_modules(arch: Architecture, targets) -> list[tuple[str, int, int]]:
    """The linear modules of one layer that LoRA wraps (same in every layer).

    targets: None (q_proj and v_proj), "all-linear" (every linear in the blocks; lm_head excluded, as in
    peft), a sequence of names (a module matches when its name equals one or ends in "." + name), or a
    regex string matched in full against names like "model.layers.0.self_attn.q_proj".
    """
    modules = arch.linear_modules()
    if targets is None:
        targets = DEFAULT_TARGETS
    if targets == "all-linear":
        chosen = modules
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as err:
            raise ValueError(f"targets regex {targets!r} does not compile: {err}") from None
        problem = pattern_problem(targets)
        if problem:
            raise ValueError(f"targets regex {problem}")
        chosen = [m for m in modules
                  if any(pattern.fullmatch(f"model.layers.{i}.{m[0]}") for i in range(arch.num_layers))]
    else:
        chosen = [m for m in modules
                  if any(m[0] == t or m[0].endswith("." + t) for t in targets)]
    if not chosen:
        names = ", ".join(n.split(".")[-1] for n, _, _ in modules)
        raise ValueError(f"targets {targets!r} match no linear module of {arch.name}; its linear modules: "
                         f"{names} (or 'all-linear')")
    return chosen


def trainable_parameters(arch: Architecture, config: PlanConfig) -> int:
    """Full: every parameter. LoRA/QLoRA: r * (in + out) for each targeted linear of each layer."""
    if config.method == "full":
        return arch.num_parameters()
    per_layer = sum(config.rank * (i + o) for _, i, o in targeted_modules(arch, config.targets))
    return arch.num_layers * per_layer


def _optimizer_bytes_per_param(optimizer: str, param_bytes: int, numel: int) -> float:
    if optimizer == "adamw":
        return 2 * param_bytes
    if optimizer == "adamw8bit":
        return 2 * (1 + 4 / 256) if numel >= 4096 else 8
    return 0.0


def layer_activation_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Bytes one decoder layer saves for backward, for T = batch*seq tokens (no checkpointing).

    Per token, with the notation of the module docstring (counted from autograd's saved tensors):
      RMSNorm (each of norms_per_layer): 4h (fp32 copy of the input) + 4 (rsqrt), plus, when the norm
        weight trains, its normalized input: p*h (Llama) or 4h (Gemma, normalizes in fp32).
      attention (sdpa/flash): p*(dq + dkv + dkv + dq) (q, k, v, output) + 4*nh (logsumexp);
        Phi-3 keeps the whole fused qkv output alive through the v view: p*(3dq + 3dkv).
      attention (eager): q, repeated k and v (p*dq each, or p*dkv without GQA), the fp32 softmax and
        its p-byte copy (4 + p)*nh*s [+ p*nh*s for soft-capping's tanh]; o_proj's contiguous input p*dq
        when o_proj trains.
      gated MLP: gate, up and act(gate): 3*p*I; x (+ k experts: times top-k, plus p*h routing product).
      linear inputs kept for weight gradients, full fine-tuning: p*h (q/k/v), p*h (gate/up), p*I (down).
      LoRA on a linear with input width n (lorakit's fused update, fused.py): the input once per group
        of adapters reading it, in the base's dtype; per adapter A's output a*r and, with dropout, the
        dropped positions: 8*p_drop*n bytes on the CPU (p_drop <= 0.5), else a 1-byte mask n.
    """
    a = arch
    t = config.batch_size * config.seq_len
    p = DTYPES[config.dtype]
    ab = DTYPES[config.adapter_dtype]
    full = config.method == "full"
    h, inter, dq, dkv = a.hidden_size, a.intermediate_size, a.q_dim, a.kv_dim
    gemma_norm = a.norms_per_layer == 4

    per_token = a.norms_per_layer * (4 * h + 4)
    if full:
        per_token += a.norms_per_layer * (4 if gemma_norm else p) * h

    if a.attention == "sdpa":
        per_token += p * (3 * dq + 3 * dkv) if a.fused_projections else p * (2 * dq + 2 * dkv)
        per_token += 4 * a.num_heads
    else:
        kv = dq if a.num_kv_heads != a.num_heads else dkv
        per_token += p * (dq + 2 * kv)
        per_token += a.num_heads * config.seq_len * (4 + (p if p != 4 else 0) + (p if a.attn_softcap else 0))

    experts = a.experts_per_token if a.num_experts else 1
    mlp = 3 * p * inter
    if a.num_experts:
        mlp += p * h  # routed output times its routing weight
        if full:
            mlp += p * h  # the gathered tokens each expert's gate_up matmul saves
    per_token += experts * mlp

    if full:
        per_token += p * h + p * h + experts * p * inter  # q/k/v, gate/up and down inputs
        if a.attention == "eager":
            per_token += p * dq  # o_proj input: a contiguous copy in eager attention
    else:
        groups = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                  "self_attn.qkv_proj": "attn_in", "self_attn.o_proj": "attn_out",
                  "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.gate_up_proj": "mlp_in",
                  "mlp.down_proj": "mlp_act"}
        # Bytes per token of each group's input when saved as is (0: already saved by another op).
        shared = {"attn_in": p * h, "attn_out": p * dq if a.attention == "eager" else 0,
                  "mlp_in": p * h, "mlp_act": p * inter}
        used_groups = set()
        drop = config.lora_dropout
        sample = 8 * drop if config.device == "cpu" and drop <= 0.5 else 1  # bytes per input element
        for name, n_in, _ in targeted_modules(a, config.targets):
            per_token += ab * config.rank + (sample * n_in if drop > 0 else 0)
            used_groups.add(groups[name])
        per_token += sum(shared[g] for g in used_groups)
    return t * per_token


def head_activation_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Final norm and lm_head input: (4 + p)*h + p*h per token when training fully, else 4h. The
    chunked loss keeps no head input: it forms the head's gradient in its forward."""
    t = config.batch_size * config.seq_len
    p = DTYPES[config.dtype]
    h = arch.hidden_size
    if config.method == "full":
        return t * ((4 + (4 if arch.norms_per_layer == 4 else p)) * h + (0 if arch.chunked_loss else p * h))
    return t * 4 * h


def logits_bytes(arch: Architecture, config: PlanConfig) -> int:
    """The loss's memory at its peak, on top of the activations.

    Chunked (loss.chunked_cross_entropy, lorakit's loss where the logits are the head's output):
    the gradient w.r.t. the hidden states p*T*h and, when the head trains, its float32 gradient
    4*V*h (formed during the forward; cast to p in backward: + p*V*h in 16 bits); and one chunk of
    C = min(256, T) tokens: its float32 logits and logsumexp's temporary of the same size (8*C*V).
    Otherwise 12*T*V: fp32 log_softmax output, its incoming gradient and its input gradient (plus
    p*T*V for a soft-capped tanh kept for backward)."""
    t = config.batch_size * config.seq_len
    p = DTYPES[config.dtype]
    v, h = arch.vocab_size, arch.hidden_size
    if arch.chunked_loss:
        # the head's float32 gradient (summed in place) and, in 16 bits, its cast in backward
        head = (4 + (p if p != 4 else 0)) * v * h if config.method == "full" else 0
        chunk = min(DEFAULT_CHUNK_SIZE, t) * v * 8
        return t * h * p + head + chunk
    extra = p if arch.final_softcap else 0
    return t * v * (12 + extra)


def layer_backward_transient_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Gradients alive inside one layer's backward on top of its saved tensors: ~p*T*(3I + 2h)
    (the MLP's grad of down's input, of act and of up; the residual gradient and one more of width h)."""
    t = config.batch_size * config.seq_len
    p = DTYPES[config.dtype]
    k = arch.experts_per_token if arch.num_experts else 1
    return t * p * (3 * arch.intermediate_size * k + 2 * arch.hidden_size)


# ----------------------------------------------------------------------------------------------
# Planning


def plan(model: str | Architecture | dict, config: PlanConfig | None = None, *,
         budget_gib: float | None = None, domain_shift: bool = False, recommend: bool = True,
         **overrides) -> Plan:
    """Predict the memory of one training step of `model` under `config` (or PlanConfig(**overrides))."""
    config = replace(config or PlanConfig(), **overrides)
    if isinstance(config.targets, list):
        config = replace(config, targets=tuple(config.targets))
    config.validate()
    if budget_gib is not None and not (isinstance(budget_gib, (int, float)) and not isinstance(budget_gib, bool)
                                       and 0 < budget_gib <= MAX_BUDGET_GIB):
        raise ValueError(f"budget_gib (lorakit plan --gpu-gb) = {budget_gib!r} must be a number of GiB in "
                         f"(0, {MAX_BUDGET_GIB:,}] (e.g. {', '.join(map(str, GPUS))})")
    arch = resolve_model(model)
    p = DTYPES[config.dtype]
    n = config.n_gpus
    full = config.method == "full"
    total = arch.num_parameters()
    trainable = trainable_parameters(arch, config)

    # Weights: base (+ quantization constants) and adapters.
    quantized = arch.num_layers * arch.quantizable_layer_parameters() if config.method == "qlora" else 0
    base = quantized // 2 + (total - quantized) * p
    const_bits = (8 / 64 + 32 / (64 * 256)) if config.double_quant else 32 / 64
    quant_constants = math.ceil(quantized * const_bits / 8)
    train_bytes = p if full else DTYPES[config.adapter_dtype]
    adapters = 0 if full else trainable * train_bytes

    # Gradients and optimizer states, by tensor: LoRA tensors are r x in and out x r.
    grads = trainable * train_bytes
    if full:
        states = trainable * _optimizer_bytes_per_param(config.optimizer, p, 1 << 20)
        largest = max(arch.vocab_size * arch.hidden_size, max(i * o for _, i, o in arch.linear_modules()),
                      2 * arch.num_experts * arch.hidden_size * arch.intermediate_size)
    else:
        states = 0.0
        for _, n_in, n_out in targeted_modules(arch, config.targets):
            for numel in (config.rank * n_in, config.rank * n_out):
                states += arch.num_layers * numel * _optimizer_bytes_per_param(config.optimizer, train_bytes, numel)
        largest = config.rank * max(max(i, o) for _, i, o in targeted_modules(arch, config.targets))
    states = int(states)
    state_bytes = {"adamw": train_bytes, "adamw8bit": 4, "sgd": 0}[config.optimizer]
    if config.optimizer == "adamw" and config.device == "cuda":
        step_temp = trainable * state_bytes  # foreach: _foreach_sqrt(exp_avg_sq) copies every state
    elif config.optimizer == "adamw":
        step_temp = 2 * largest * state_bytes  # per tensor: sqrt() then / bias correction
    else:
        step_temp = 0

    # Activations.
    layer_acts = layer_activation_bytes(arch, config)
    head_acts = head_activation_bytes(arch, config)
    t = config.batch_size * config.seq_len
    ckpt_inputs = arch.num_layers * t * arch.hidden_size * p
    acts_no_ckpt = arch.num_layers * layer_acts + head_acts
    acts_ckpt = ckpt_inputs + head_acts + layer_acts  # one layer recomputed at a time in backward
    logits = logits_bytes(arch, config)
    transient = layer_backward_transient_bytes(arch, config)
    if config.method == "qlora":
        transient += max(i * o for _, i, o in arch.linear_modules()) * p  # one dequantized weight

    # FSDP full sharding over n GPUs: persistent state divided, two layers gathered, one layer's grads.
    layer_params = arch.layer_parameters()
    fsdp_extra = 0
    if n > 1:
        per_layer_weight = (arch.quantizable_layer_parameters() // 2 + (layer_params - arch.quantizable_layer_parameters()) * p
                            if config.method == "qlora" else layer_params * p)
        # The FSDP root (embeddings, final norm, head) is gathered from the step's forward to the
        # end of its backward: whole on every rank, not 1/n of it.
        root_weight = (arch.embedding_parameters() + arch.hidden_size) * p
        fsdp_extra = 2 * per_layer_weight + (layer_params * p if full else 0) + root_weight - root_weight // n
    persistent = math.ceil((base + quant_constants + adapters + states) / n) + fsdp_extra
    grads_shard = math.ceil(grads / n)
    # full fine-tuning: the head's gradient stays whole until the root's backward ends
    head_grad = arch.vocab_size * arch.hidden_size * p if full else 0
    layer_grad = math.ceil(layer_params * p / n) if full else math.ceil(grads / arch.num_layers / n)

    # Backward through the layers: after k of L layers, their grads exist and their activations are gone.
    phases = {}
    if config.grad_checkpointing:
        start_acts = ckpt_inputs + head_acts
        phases["backward start"] = persistent + start_acts + logits
        layer_peak = max(persistent + head_grad + (arch.num_layers - k) * t * arch.hidden_size * p
                         + layer_acts + transient + k * layer_grad for k in range(arch.num_layers))
    else:
        phases["backward start"] = persistent + acts_no_ckpt + logits
        layer_peak = max(persistent + head_grad + head_acts + (arch.num_layers - k) * layer_acts + transient
                         + k * layer_grad for k in range(arch.num_layers))
    phases["layer backward"] = layer_peak
    tied_extra = math.ceil(arch.vocab_size * arch.hidden_size * p / n) if full and arch.tie_embeddings else 0
    phases["backward end"] = persistent + grads_shard + tied_extra
    phases["optimizer step"] = persistent + grads_shard + math.ceil(step_temp / n)
    peak_phase = max(phases, key=phases.get)
    peak_allocated = phases[peak_phase]
    overhead = 0
    if config.device == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * peak_allocated) + (NCCL_BYTES if n > 1 else 0)

    components = {
        "base_weights": base,
        "quant_constants": quant_constants,
        "adapter_weights": adapters,
        "gradients": grads,
        "optimizer_states": states,
        "activations": acts_ckpt if config.grad_checkpointing else acts_no_ckpt,
        "logits_and_loss": logits,
        "transient": max(transient, step_temp),
        "runtime_overhead": overhead,
    }
    result = Plan(arch=arch, config=config, total_params=total, trainable_params=trainable,
                  quantized_params=quantized, components=components,
                  activations_without_checkpointing=acts_no_ckpt, activations_with_checkpointing=acts_ckpt,
                  phases=phases, peak_phase=peak_phase, peak_allocated=peak_allocated,
                  runtime_overhead=overhead, peak=peak_allocated + overhead)
    if recommend:
        result = replace(result, recommendation=recommend_method(result, budget_gib, domain_shift))
    return result


def fits(plan_: Plan, gpu_gb: float, n_gpus: int = 1) -> bool:
    """Whether the step fits on n_gpus GPUs of gpu_gb GiB each (FSDP full sharding when n_gpus > 1)."""
    if n_gpus != plan_.config.n_gpus:
        plan_ = plan(plan_.arch, replace(plan_.config, n_gpus=n_gpus), recommend=False)
    return plan_.peak <= gpu_gb * GiB


def recommend_method(plan_: Plan, budget_gib: float | None = None, domain_shift: bool = False) -> Recommendation:
    """The seed's rules, applied to predicted peaks on `budget_gib` per GPU (default: one 24 GiB GPU):
    full fine-tuning only for a large domain shift (and only if it fits); LoRA for models up to ~7B when
    it fits; QLoRA for 7B-70B on limited memory, i.e. whenever LoRA does not fit."""
    budget = DEFAULT_BUDGET_GIB if budget_gib is None else budget_gib
    n = plan_.config.n_gpus
    peaks = {m: plan(plan_.arch, replace(plan_.config, method=m, dtype="bf16" if m == "qlora" and plan_.config.dtype == "fp32" else plan_.config.dtype), recommend=False).peak / GiB
             for m in METHODS}
    on = f"{n} x {budget:g} GiB" if n > 1 else f"{budget:g} GiB"
    billions = plan_.total_params / 1e9
    fit = {m: peaks[m] <= budget for m in METHODS}
    if domain_shift and fit["full"]:
        return Recommendation("full", f"a large domain shift warrants updating every weight, and full "
                              f"fine-tuning fits ({peaks['full']:.1f} of {on})", budget, peaks)
    prefix = (f"full fine-tuning would need {peaks['full']:.1f} GiB, more than {on}; " if domain_shift else "")
    if fit["lora"] and (billions < 7 or peaks["lora"] <= 0.9 * budget):
        return Recommendation("lora", prefix + f"a {billions:.1f}B model fits in 16-bit with LoRA "
                              f"({peaks['lora']:.1f} of {on}): no quantization error, faster steps than QLoRA",
                              budget, peaks)
    if fit["qlora"]:
        return Recommendation("qlora", prefix + f"LoRA on 16-bit weights needs {peaks['lora']:.1f} GiB; "
                              f"with the {billions:.1f}B base in 4-bit NF4, QLoRA needs {peaks['qlora']:.1f} "
                              f"of {on}", budget, peaks)
    more = next((k for k in (2, 4, 8, 16, 32) if fits(replace(plan_, config=replace(plan_.config, method="qlora",
                 dtype="bf16" if plan_.config.dtype == "fp32" else plan_.config.dtype)), budget, k)), None)
    hint = f"shard over {more} GPUs" if more else "use larger GPUs"
    if not plan_.config.grad_checkpointing:
        hint += " or enable gradient checkpointing"
    return Recommendation("qlora", prefix + f"nothing fits on {on} (QLoRA needs {peaks['qlora']:.1f} GiB); "
                          f"QLoRA is the smallest: {hint}, or shorten batch x sequence", budget, peaks)


def device_warning(plan_: Plan, device_gib: float) -> str | None:
    """A warning for `lorakit train` when the planned step will not fit the device it runs on."""
    if plan_.peak <= device_gib * GiB:
        return None
    return (f"warning: the planned step needs {plan_.peak / GiB:.1f} GiB but the device has {device_gib:.1f} "
            f"GiB; try gradient checkpointing, a smaller batch or sequence, or method 'qlora' "
            f"(`lorakit plan` shows the breakdown)")


# ----------------------------------------------------------------------------------------------
# Rendering

_LABELS = {
    "base_weights": "base weights",
    "quant_constants": "quantization constants",
    "adapter_weights": "adapter weights",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits_and_loss": "logits and loss",
    "transient": "transient buffers",
    "runtime_overhead": "runtime overhead",
}


def _gib(n: float) -> str:
    return f"{n / GiB:9.2f} GiB"


def render_plan(plan_: Plan) -> str:
    """A human-readable breakdown, peak, GPU fit table and recommendation."""
    c, a = plan_.config, plan_.arch
    lines = [
        f"lorakit plan: {a.name}  method={c.method} dtype={c.dtype} optimizer={c.optimizer} "
        f"batch={c.batch_size} seq={c.seq_len} checkpointing={'on' if c.grad_checkpointing else 'off'} "
        f"gpus={c.n_gpus}" + ("" if c.method == "full" else f" rank={c.rank}"),
        f"parameters: {plan_.total_params:,} total, {plan_.trainable_params:,} trainable "
        f"({100 * plan_.trainable_params / plan_.total_params:.3f}%)"
        + (f", {plan_.quantized_params:,} in NF4" if plan_.quantized_params else ""),
        "",
        "component                     size (all GPUs)",
    ]
    for key, value in plan_.components.items():
        lines.append(f"  {_LABELS[key]:26s}{_gib(value)}")
    lines.append(f"  activations w/o checkpoint  {_gib(plan_.activations_without_checkpointing)}")
    lines.append(f"  activations w/ checkpoint   {_gib(plan_.activations_with_checkpointing)}")
    lines += ["", "moment of the step            allocated per GPU"]
    for key, value in plan_.phases.items():
        mark = "  <- peak" if key == plan_.peak_phase else ""
        lines.append(f"  {key:26s}{_gib(value)}{mark}")
    lines += [
        f"predicted peak per GPU: {plan_.peak / GiB:.2f} GiB "
        f"({plan_.peak_allocated / GiB:.2f} allocated + {plan_.runtime_overhead / GiB:.2f} runtime overhead)",
        "",
        "fits on     1 GPU  2 GPUs  4 GPUs  8 GPUs   (FSDP sharding for >1)",
    ]
    for gib, examples in GPUS.items():
        marks = "".join(f"{'yes' if fits(plan_, gib, k) else 'no':>7s} " for k in (1, 2, 4, 8))
        lines.append(f"  {gib:3d} GiB {marks}  {examples}")
    if plan_.recommendation is not None:
        r = plan_.recommendation
        lines += ["", f"recommendation: {r.method} ({r.budget_gib:g} GiB per GPU budget): {r.reason}"]
    return "\n".join(lines)
