"""Peak accelerator memory of one training step: the formulas, one function per part of the step.

Everything here is arithmetic over an `Architecture` (shapes only, no weights). The model is a list of
tensors that are alive at the same time, following what PyTorch autograd actually keeps for a Hugging
Face decoder (Llama, Mistral, Qwen2, Gemma 2, Phi-3, Mixtral) trained with `loss = model(...).loss;
loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)`.

Notation (per micro-batch on one device): b batch (rows: preference pairs count twice), s sequence
length, T = b*s tokens, n_a answer tokens (the preference objectives' scored tokens), h hidden size,
I MLP intermediate size, L layers, nh / nkv query / key-value heads, hd head dim, dq = nh*hd,
dkv = nkv*hd, V vocabulary, P parameters, p bytes of the compute dtype (2 for bfloat16/float16, 4 for
float32), a bytes of the adapter dtype (4: adapters are kept in float32, as peft does), r LoRA rank,
N GPUs sharding the model (FSDP).

Each part of the step has its function below, with its formula in the docstring:
  base_weight_bytes, quant_constant_bytes, adapter_weight_bytes   weights
  gradient_bytes, optimizer_state_bytes, optimizer_step_bytes      training state and the step
  layer_activation_bytes, head_activation_bytes, activation_bytes  tensors saved for backward
  logits_bytes, preference_logits_bytes                             the loss (SFT; DPO / ORPO)
  transient_bytes                                                   buffers inside one layer's backward
  fsdp_gathered_bytes                                               FSDP's unsharded layers
  phase_bytes                                                       the four moments of the step
  runtime_overhead_bytes                                            what the allocator does not count
  pissa_svd_shapes, svd_flops, pissa_init_flops, pissa_init_bytes   PiSSA's SVDs at start-up (init "pissa")

The peak is the largest of four moments of a steady-state step (optimizer states already exist):
  backward start   weights + states + all activations + logits/loss
  layer backward   weights + states + lm_head grad + activations still needed + grads so far + transient
  backward end     weights + states + all grads (+ the tied embedding's second grad)
  optimizer step   weights + states + all grads + optimizer temporaries
With FSDP over N GPUs (full sharding) weights, grads and states are divided by N and two layers'
unsharded parameters (all-gather with prefetch) plus one layer's unsharded gradient are added.
Measured against real steps in bench/plan_vs_measured.py.

The preference objectives (objective "dpo" or "orpo", training.objectives.PreferenceLoss): a micro-batch
of B pairs is 2B rows (the chosen and the rejected sequences), so every per-token term above counts
2B*s tokens; the loss term is preference_logits_bytes instead of logits_bytes. DPO's reference is the
same weights with the adapters disabled (no second copy), its forward runs without gradients before
the policy's: it saves nothing, and its short-lived logits are smaller than the policy's backward peak.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from ..config import INIT_MODES, METHODS, OBJECTIVES, PREFERENCE_OBJECTIVES
from ..dtypes import ALIASES as DTYPE_ALIASES
from ..dtypes import BYTES, NAMES
from ..loss import DEFAULT_CHUNK_SIZE
from .architecture import Architecture, targeted_modules, targeted_parameters

GiB = 1024**3
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
DEVICES = ("cuda", "cpu")
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
FSDP_MAX_GPUS = 1 << 16
PISSA_PHASE = "start-up: PiSSA init"  # phase_bytes's moment before the first step (device cpu, init pissa)


@dataclass(frozen=True)
class PlanConfig:
    """What is trained and how. `batch_size` is the micro-batch per GPU.

    dtype and adapter_dtype are lorakit's dtype names (lorakit.dtypes: float32, bfloat16, float16);
    the short forms fp32 / bf16 / fp16 are accepted and stored under the long name.
    """

    method: str = "lora"
    rank: int = 8
    targets: tuple[str, ...] | str | None = None  # None: q_proj, v_proj; "all-linear"; names; a regex
    batch_size: int = 1
    seq_len: int = 2048
    grad_checkpointing: bool = False
    optimizer: str = "adamw"
    dtype: str = "bfloat16"
    n_gpus: int = 1
    lora_dropout: float = 0.0
    adapter_dtype: str = "float32"
    double_quant: bool = True
    device: str = "cuda"  # "cpu" changes only the optimizer's temporaries and drops the CUDA overhead
    objective: str = "sft"  # "dpo" / "orpo": batch_size pairs, 2 * batch_size sequences (preference_logits_bytes)
    answer_tokens: int | None = None  # preference: n_a scored tokens per micro-batch; None: the bound 2*b*s
    dora: bool = False  # DoRA on the targeted linears: a magnitude per output (dora_* terms below)
    target_parameters: tuple[str, ...] | None = None  # parameters adapted directly (expert LoRA), e.g. experts.down_proj
    init: str = "default"  # the adapters' initialisation (config.INIT_MODES); "pissa": SVDs at start-up (pissa_*)
    pissa_niter: int | None = None  # init "pissa": None, the full SVD; N, a randomized SVD with N iterations
    # Batches with an attention mask (padded rows; packed rows where segment attention does not apply):
    # transformers hands SDPA a (B, 1, T, T) mask, which every layer keeps, and repeats k and v for it
    # (GQA goes to SDPA only without a mask)
    masked_attention: bool = False
    # Packed rows attended example by example (lorakit.attention, Architecture.segment_attention): no
    # mask; each example's SDPA output is kept, and their concatenation (o_proj's input) beside them
    segment_attention: bool = False

    def __post_init__(self) -> None:
        # one vocabulary inside: "bf16" is stored as "bfloat16"; unknown names are left for validate()
        for name in ("dtype", "adapter_dtype"):
            value = getattr(self, name)
            if isinstance(value, str) and value in DTYPE_ALIASES:
                object.__setattr__(self, name, DTYPE_ALIASES[value])
        for name in ("targets", "target_parameters"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> None:
        """Raise one ValueError that lists every invalid field, its value and the valid choices."""
        problems = []
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} is not one of {', '.join(sorted(METHODS))}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        dtype_names = f"{', '.join(sorted(DTYPE_ALIASES))} (or {', '.join(NAMES)})"
        if self.dtype not in BYTES:
            problems.append(f"dtype {self.dtype!r} is not one of {dtype_names}")
        if self.adapter_dtype not in BYTES:
            problems.append(f"adapter_dtype {self.adapter_dtype!r} is not one of {dtype_names}")
        if self.device not in DEVICES:
            problems.append(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.objective not in OBJECTIVES:
            problems.append(f"objective {self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        elif self.objective == "dpo" and self.method == "full":
            problems.append("objective 'dpo' with method 'full': DPO's reference is the model with its adapters "
                            "disabled, which full fine-tuning has not; use method lora or qlora, or objective orpo")
        rows_tokens = 2 * self.batch_size * self.seq_len if isinstance(self.batch_size, int) and isinstance(
            self.seq_len, int) else None
        if self.answer_tokens is not None:
            if self.objective not in PREFERENCE_OBJECTIVES:
                problems.append(f"answer_tokens={self.answer_tokens!r} is for objective dpo or orpo, "
                                f"not {self.objective!r}")
            elif (not isinstance(self.answer_tokens, int) or isinstance(self.answer_tokens, bool)
                  or self.answer_tokens < 1):
                problems.append(f"answer_tokens must be a positive integer, got {self.answer_tokens!r}")
            elif rows_tokens is not None and self.answer_tokens > rows_tokens:
                problems.append(f"answer_tokens must be at most 2 * batch_size * seq_len = {rows_tokens:,}, "
                                f"got {self.answer_tokens:,}")
        for name, most in (("rank", 1 << 16), ("batch_size", 1 << 20), ("seq_len", 1 << 24),
                           ("n_gpus", FSDP_MAX_GPUS)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
            elif value > most:
                problems.append(f"{name} must be at most {most:,}, got {value:,}")
        if not isinstance(self.dora, bool):
            problems.append(f"dora must be true or false, got {self.dora!r}")
        for name in ("masked_attention", "segment_attention"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.masked_attention is True and self.segment_attention is True:
            problems.append("masked_attention and segment_attention are both true: packed rows attended "
                            "example by example carry no mask; set one of them")
        if self.target_parameters is not None and not (
                isinstance(self.target_parameters, tuple) and self.target_parameters
                and all(isinstance(n, str) for n in self.target_parameters)):
            problems.append(f"target_parameters must be a non-empty list of parameter names (e.g. "
                            f"['experts.gate_up_proj']) or None, got {self.target_parameters!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init not in INIT_MODES:
            problems.append(f"init {self.init!r} is not one of {', '.join(INIT_MODES)}")
        if self.pissa_niter is not None and (not isinstance(self.pissa_niter, int) or isinstance(self.pissa_niter, bool)
                                             or self.pissa_niter < 0):
            problems.append(f"pissa_niter must be an integer >= 0 (subspace iterations of the randomized SVD) or "
                            f"None (the full SVD), got {self.pissa_niter!r}")
        if problems:
            raise ValueError("invalid plan configuration: " + "; ".join(problems))

    @property
    def preference(self) -> bool:
        """Whether a micro-batch is pairs (objective dpo or orpo)."""
        return self.objective in PREFERENCE_OBJECTIVES

    @property
    def rows(self) -> int:
        """Sequences of one micro-batch: b, or 2b for b preference pairs (chosen and rejected)."""
        return 2 * self.batch_size if self.preference else self.batch_size

    @property
    def tokens(self) -> int:
        """T = rows*s: tokens of one micro-batch (2b*s for b preference pairs)."""
        return self.rows * self.seq_len

    @property
    def scored_tokens(self) -> int:
        """n_a: the answer tokens the preference loss scores (answer_tokens, or the bound 2*b*s)."""
        return self.tokens if self.answer_tokens is None else self.answer_tokens

    @property
    def p(self) -> int:
        """Bytes per element of the compute dtype."""
        return BYTES[self.dtype]

    @property
    def trained_bytes(self) -> int:
        """Bytes per trainable parameter: the compute dtype in full fine-tuning, else the adapters'."""
        return self.p if self.method == "full" else BYTES[self.adapter_dtype]


@dataclass(frozen=True)
class Recommendation:
    """Which method to train with (recommend.recommend_method), and why."""

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
    notes: tuple[str, ...] = ()  # what the reader should know about the plan (render_plan prints them)
    # init "pissa": the SVDs at start-up, ((out, in, count), ...), their FLOPs, and the working memory
    # of the largest on top of the weights (pissa_init_bytes); empty / 0 for other initialisations
    init_svds: tuple[tuple[int, int, int], ...] = ()
    init_flops: int = 0
    init_bytes: int = 0

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
            "startup": None if not self.init_svds else {
                "init": self.config.init,
                "svds": [list(s) for s in self.init_svds],
                "flops": self.init_flops,
                "working_bytes": self.init_bytes,
            },
        }


# ----------------------------------------------------------------------------------------------
# Parameters and weights


def adapted_modules(arch: Architecture, config: PlanConfig) -> list[tuple[str, int, int]]:
    """(name, in, out) of the linears of a layer LoRA wraps: targeted_modules, or none for targets []
    with target_parameters (LoRA on parameters only, as lorakit train and peft allow)."""
    if config.targets == () and config.target_parameters:
        return []
    return targeted_modules(arch, config.targets)


def expert_lora_parameters(arch: Architecture, config: PlanConfig) -> int:
    """LoRA on parameters (target_parameters, layer.LoraParameter): L * the sum over the targeted
    parameters of a layer of r*E*(in + out) for a 3-D weight (E, out, in) or (E, in, out) (A is
    (r*E, in), B is (out, r*E): a rank-r update per expert), r*(in + out) for a 2-D weight; 0 for
    full fine-tuning (every weight trains)."""
    if config.method == "full":
        return 0
    per_layer = sum(config.rank * (shape[0] if len(shape) == 3 else 1) * (shape[-1] + shape[-2])
                    for _, shape in targeted_parameters(arch, config.target_parameters))
    return arch.num_layers * per_layer


def adapter_tensor_sizes(arch: Architecture, config: PlanConfig) -> list[int]:
    """Elements of each trained tensor of one layer (LoRA/QLoRA): A (r*in) and B (r*out) of each
    targeted linear, then, with DoRA, its magnitude (out), then A (r*E*in) and B (r*E*out) of each
    targeted parameter."""
    r = config.rank
    sizes = [n for _, i, o in adapted_modules(arch, config) for n in (r * i, r * o)]
    if config.dora:
        sizes += [o for _, _, o in adapted_modules(arch, config)]
    for _, shape in targeted_parameters(arch, config.target_parameters):
        experts = shape[0] if len(shape) == 3 else 1
        sizes += [r * experts * shape[-1], r * experts * shape[-2]]
    return sizes


def trainable_parameters(arch: Architecture, config: PlanConfig) -> int:
    """Full: every parameter P. LoRA/QLoRA: L * sum of r*(in + out) over the targeted linears of a
    layer (A is r x in, B is out x r; Hu et al. 2021, "LoRA"). For a 4096 x 4096 weight and r = 8:
    65,536, 256x fewer. DoRA adds each targeted linear's magnitude, out per layer (its weight,
    gradient and AdamW states in the adapter dtype: 16*out bytes in float32). Plus
    expert_lora_parameters for target_parameters."""
    if config.method == "full":
        return arch.num_parameters()
    modules = adapted_modules(arch, config)
    per_layer = sum(config.rank * (i + o) + (o if config.dora else 0) for _, i, o in modules)
    return arch.num_layers * per_layer + expert_lora_parameters(arch, config)


def quantized_parameters(arch: Architecture, config: PlanConfig) -> int:
    """QLoRA: Q = L * (the linear and expert weights of a layer), stored in NF4; else 0."""
    return arch.num_layers * arch.quantizable_layer_parameters() if config.method == "qlora" else 0


def base_weight_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Q/2 + (P - Q)*p: full/LoRA keep every weight in the compute dtype (Q = 0); QLoRA stores the
    block linears in 4-bit NF4, embeddings, norms and lm_head stay in the compute dtype (Dettmers
    et al. 2023, "QLoRA", section 2)."""
    quantized = quantized_parameters(arch, config)
    return quantized // 2 + (arch.num_parameters() - quantized) * config.p


def quant_constant_bytes(arch: Architecture, config: PlanConfig) -> int:
    """ceil(Q * c / 8), with c bits of constants per quantized weight: an absmax per 64-weight block;
    with double quantization an 8-bit absmax plus one fp32 constant per 256 blocks,
    c = 8/64 + 32/(64*256) = 0.127 (4.127 bits per weight in all), without it c = 32/64 = 0.5."""
    const_bits = (8 / 64 + 32 / (64 * 256)) if config.double_quant else 32 / 64
    return math.ceil(quantized_parameters(arch, config) * const_bits / 8)


def adapter_weight_bytes(arch: Architecture, config: PlanConfig) -> int:
    """LoRA/QLoRA: trainable * a (the A and B matrices, in the adapter dtype); full: 0 (the trained
    weights are the base weights)."""
    return 0 if config.method == "full" else trainable_parameters(arch, config) * config.trained_bytes


# ----------------------------------------------------------------------------------------------
# Training state: gradients, optimizer states, the optimizer step


def gradient_bytes(arch: Architecture, config: PlanConfig) -> int:
    """trainable * (bytes of a trainable parameter): one gradient per trainable parameter, in its dtype."""
    return trainable_parameters(arch, config) * config.trained_bytes


def _optimizer_bytes_per_param(optimizer: str, param_bytes: int, numel: int) -> float:
    if optimizer == "adamw":
        return 2 * param_bytes
    if optimizer == "adamw8bit":
        return 2 * (1 + 4 / 256) if numel >= 4096 else 8
    return 0.0


def optimizer_state_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Per tensor of n elements in a parameter dtype of q bytes:
      adamw       2*q*n (exp_avg and exp_avg_sq; torch.optim.AdamW allocates zeros_like(param))
      adamw8bit   2*(1 + 4/256)*n (bitsandbytes, blockwise, block 256), 8*n under 4096 elements (fp32)
      sgd         0 (no momentum)
    LoRA tensors are r x in and out x r in every layer; full fine-tuning counts 8-bit states as if
    every tensor were large."""
    if config.method == "full":
        states = trainable_parameters(arch, config) * _optimizer_bytes_per_param(config.optimizer, config.p,
                                                                                 1 << 20)
    else:
        states = 0.0
        for numel in adapter_tensor_sizes(arch, config):
            states += arch.num_layers * numel * _optimizer_bytes_per_param(
                config.optimizer, config.trained_bytes, numel)
    return int(states)


def optimizer_step_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Temporaries of the optimizer step, on top of the states (s bytes per state element: the
    trainable dtype for AdamW):
      AdamW on CUDA (foreach):  trainable * s   (_foreach_sqrt(exp_avg_sq) copies every state)
      AdamW on the CPU:         2 * largest * s (per tensor: sqrt(), then the bias correction's division)
      adamw8bit, sgd:           0
    largest: the largest trained tensor (embedding, a linear, two experts' weights; LoRA: r * max(in, out))."""
    if config.optimizer != "adamw":
        return 0
    state_bytes = config.trained_bytes
    if config.device == "cuda":
        return trainable_parameters(arch, config) * state_bytes
    if config.method == "full":
        largest = max(arch.vocab_size * arch.hidden_size, max(i * o for _, i, o in arch.linear_modules()),
                      arch.largest_expert_weight())
    else:
        largest = max(adapter_tensor_sizes(arch, config))
    return 2 * largest * state_bytes


# ----------------------------------------------------------------------------------------------
# Activations and the loss


def lean_mlp(arch: Architecture, config: PlanConfig) -> bool:
    """Does the MLP keep gate(x) and up(x) only (gated_mlp)? With adapters (add_lora switches it on)
    on a gated MLP, without checkpointing (torch's non-reentrant checkpoint, as lorakit train runs
    it, recomputes a layer under its own saved-tensor hooks, where gated_mlp steps aside)."""
    return config.method != "full" and arch.lean_mlp and not config.grad_checkpointing


def layer_activation_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Bytes one decoder layer saves for backward, for T = batch*seq tokens (no checkpointing).

    This is Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
    eq. 1: s*b*h*(34 + 5*a*s/h) for GPT) redone for the Llama block as Hugging Face implements it.
    Per token, counted from autograd's saved tensors:
      RMSNorm (each of norms_per_layer): 4h (fp32 copy of the input) + 4 (rsqrt), plus, when the norm
        weight trains, its normalized input: p*h (Llama) or 4h (Gemma, normalizes in fp32).
      attention (sdpa/flash): p*(dq + dkv + dkv + dq) (q, k, v, output) + 4*nh (logsumexp);
        Phi-3 keeps the whole fused qkv output alive through the v view: p*(3dq + 3dkv).
        With an attention mask (masked_attention: padded or packed rows) the layer also keeps the
        (B, 1, T, T) mask, p*T per token, and k and v repeated to dq heads: + 2*p*(dq - dkv).
        Packed rows attended example by example (segment_attention) keep no mask, but each example's
        output and their concatenation (o_proj's input), where sdpa's one output is o_proj's: + p*dq.
      attention (eager): q, repeated k and v (p*dq each, or p*dkv without GQA), the fp32 softmax and
        its p-byte copy (4 + p)*nh*s [+ p*nh*s for soft-capping's tanh]; o_proj's contiguous input p*dq
        when o_proj trains.
      gated MLP: gate, up and act(gate): 3*p*I; x (+ k experts: times top-k, plus p*h routing product);
        with adapters on a dense gated MLP (gated_mlp, Architecture.lean_mlp): gate and up, 2*p*I,
        and down's input is recomputed in backward, not kept.
      linear inputs kept for weight gradients, full fine-tuning: p*h (q/k/v), p*h (gate/up), p*I (down).
      LoRA on a linear with input width n (lorakit's fused update, fused.py): the input once per group
        of adapters reading it, in the base's dtype; per adapter A's output a*r and, with dropout, the
        dropped positions: 8*p_drop*n bytes on the CPU (p_drop <= 0.5), else a 1-byte mask n.
    """
    a = arch
    t = config.tokens
    p = config.p
    ab = BYTES[config.adapter_dtype]
    full = config.method == "full"
    h, inter, dq, dkv = a.hidden_size, a.intermediate_size, a.q_dim, a.kv_dim
    gemma_norm = a.norms_per_layer == 4

    per_token = a.norms_per_layer * (4 * h + 4)
    if full:
        per_token += a.norms_per_layer * (4 if gemma_norm else p) * h

    if a.attention == "sdpa":
        per_token += p * (3 * dq + 3 * dkv) if a.fused_projections else p * (2 * dq + 2 * dkv)
        per_token += 4 * a.num_heads
        if config.masked_attention:  # the layer's mask, p*T per token; k and v repeated to dq when GQA
            per_token += p * config.seq_len
            if dkv != dq:
                per_token += 2 * p * (dq if a.fused_projections else dq - dkv)
        elif config.segment_attention:
            per_token += p * dq
    else:
        kv = dq if a.num_kv_heads != a.num_heads else dkv
        per_token += p * (dq + 2 * kv)
        per_token += a.num_heads * config.seq_len * (4 + (p if p != 4 else 0) + (p if a.attn_softcap else 0))

    experts = a.experts_per_token if a.num_experts else 1
    lean = lean_mlp(a, config)
    mlp = (2 if lean else 3) * p * inter
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
                  "mlp_in": p * h, "mlp_act": 0 if lean else p * inter}
        used_groups = set()
        drop = config.lora_dropout
        sample = 8 * drop if config.device == "cpu" and drop <= 0.5 else 1  # bytes per input element
        for name, n_in, n_out in adapted_modules(a, config):
            per_token += ab * config.rank + (sample * n_in if drop > 0 else 0)
            if config.dora:  # the product g scales (layer._fused_dora)
                per_token += p * n_out
            if config.dora and drop > 0:  # the dropped input h, kept instead of the input
                per_token += ab * n_in
                continue
            # A module of a family the formulas do not describe saves its own input.
            used_groups.add(groups.get(name, name))
            shared.setdefault(name, p * n_in)
        per_token += sum(shared[g] for g in used_groups)
    return t * per_token


def head_activation_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Final norm and lm_head input: (4 + p)*h + p*h per token when training fully, else 4h. The
    chunked loss keeps no head input: it forms the head's gradient in its forward."""
    t = config.tokens
    p = config.p
    h = arch.hidden_size
    if config.method == "full":
        return t * ((4 + (4 if arch.norms_per_layer == 4 else p)) * h + (0 if arch.chunked_loss else p * h))
    return t * 4 * h


def checkpoint_input_bytes(arch: Architecture, config: PlanConfig) -> int:
    """L*T*h*p: the input of every decoder layer, what gradient checkpointing keeps."""
    return arch.num_layers * config.tokens * arch.hidden_size * config.p


def activation_bytes(arch: Architecture, config: PlanConfig, checkpointing: bool) -> int:
    """All tensors saved for backward, at the start of backward.
      without checkpointing:  L * layer + head
      with checkpointing:     L*T*h*p + head + layer   (every decoder layer checkpointed, as
                              model.gradient_checkpointing_enable() does with torch.utils.checkpoint:
                              the layer inputs, plus one layer's activations while it is recomputed)
    """
    config = replace(config, grad_checkpointing=checkpointing)  # it decides the MLP's (lean_mlp)
    layer = layer_activation_bytes(arch, config)
    head = head_activation_bytes(arch, config)
    if checkpointing:
        return checkpoint_input_bytes(arch, config) + head + layer
    return arch.num_layers * layer + head


def loss_chunk_bytes(rows: int, vocab: int, p: int) -> int:
    """One chunk of loss.py's chunked losses over `rows` token rows: C = min(DEFAULT_CHUNK_SIZE, rows)
    rows of float32 logits turned into the softmax in place (4*C*V), plus in 16 bits the chunk's
    p-byte logits before the upcast (p*C*V)."""
    return min(DEFAULT_CHUNK_SIZE, rows) * vocab * (4 + (p if p < 4 else 0))


def logits_bytes(arch: Architecture, config: PlanConfig) -> int:
    """The loss's memory at its peak, on top of the activations.

    Chunked (loss.chunked_cross_entropy, lorakit's loss where the logits are the head's output):
    the gradient w.r.t. the hidden states p*T*h and, when the head trains, its float32 gradient
    4*V*h (formed during the forward; cast to p in backward: + p*V*h in 16 bits); and one chunk of
    C = min(256, T) tokens: its float32 logits, turned into the softmax in place (4*C*V), plus in 16
    bits the chunk's p-byte logits before the upcast or the softmax's p-byte cast (+ p*C*V).
    Otherwise 12*T*V: fp32 log_softmax output, its incoming gradient and its input gradient (plus
    p*T*V for a soft-capped tanh kept for backward)."""
    t = config.tokens
    p = config.p
    v, h = arch.vocab_size, arch.hidden_size
    if arch.chunked_loss:
        # the head's float32 gradient (summed in place) and, in 16 bits, its cast in backward
        head = (4 + (p if p != 4 else 0)) * v * h if config.method == "full" else 0
        return t * h * p + head + loss_chunk_bytes(t, v, p)
    extra = p if arch.final_softcap else 0
    return t * v * (12 + extra)


def preference_logits_bytes(arch: Architecture, config: PlanConfig) -> int:
    """The preference loss's memory at its peak, on top of the activations (training.objectives.
    sequence_logps), for n_a scored answer tokens of the 2B rows.

    Where the logits are the head's output (loss.supports_chunked_loss) only the n_a answer positions
    go through the head. A frozen head (LoRA, QLoRA): loss.chunked_token_logps, one chunk of
    C = min(DEFAULT_CHUNK_SIZE, n_a) rows at a time, its float32 logits turned into the softmax in
    place (4 * C * V, plus the chunk's p-byte logits before the upcast when p < 4), and the gradient
    it forms for the hidden states, kept for backward (n_a * h * p):
        n_a * h * p + 4 * C * V [+ p * C * V]
    A trained head (full fine-tuning, ORPO) takes the full logits through autograd instead:
    (n_a, V) logits in p bytes, upcast to float32 (the same tensor when p = 4).
    The peak is in backward, before the gradient reaches the head: logsumexp's saved float32 logits,
    the gather's gradient, and logsumexp's backward, which forms exp(z - lse) before scaling it by the
    incoming gradient (a temporary and its result), all float32 and (n_a, V):
        16 * n_a * V
    whatever p (the cast of the gradient back to p bytes comes after the saved logits and the
    temporaries are freed: 6 * n_a * V then). Measured within 1% on the CPU allocator
    (bench/plan_vs_measured.py: 15.8 * n_a * V in bfloat16 and in float32); the forward holds at
    most p + 8 bytes per (token, entry). Full fine-tuning (ORPO) also keeps the head's input,
    n_a*h*p, for the head's weight gradient. Without a chunked loss (the model forms all 2B*s
    logits): SFT's unchunked term over the 2B rows. DPO's reference forward (no gradients, before the
    policy's) holds at most p + 8 bytes per (token, entry) while nothing of the policy is saved yet."""
    if not arch.chunked_loss:
        return logits_bytes(arch, config)
    n, v, p = config.scored_tokens, arch.vocab_size, config.p
    if config.method != "full":  # a frozen head: chunked_token_logps
        return n * arch.hidden_size * p + loss_chunk_bytes(n, v, p)
    return 16 * n * v + n * arch.hidden_size * p  # the trained head also keeps its input, n_a*h*p


def layer_backward_transient_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Gradients alive inside one layer's backward on top of its saved tensors: ~p*T*(3I + 2h)
    (the MLP's grad of down's input, of act and of up; the residual gradient and one more of width h);
    p*T*(4I + 2h) where the MLP recomputes act(gate) in backward (gated_mlp: the grad of down's
    input, act(gate), the grad of the product times up, the grad of gate)."""
    t = config.tokens
    p = config.p
    k = arch.experts_per_token if arch.num_experts else 1
    mlp = 4 if lean_mlp(arch, config) else 3
    return t * p * (mlp * arch.intermediate_size * k + 2 * arch.hidden_size)


def dora_norm_bytes(arch: Architecture, config: PlanConfig) -> int:
    """DoRA's weight norm ||W + dW|| (layer.LoraLinear.weight_norm, each forward, no gradient), for the
    largest targeted linear (out, in): it never forms W + dW, so what it allocates is the float32 copy
    of a 16-bit or NF4 base weight (4*out*in; a float32 base's own weight is used as is) and three
    (out, r) float32 products (W Aᵀ, B (A Aᵀ) and an elementwise one):
        4 * out * in + 12 * out * r    (16-bit or NF4 base),   12 * out * r    (float32 base)
    0 without DoRA."""
    if not config.dora or config.method == "full":
        return 0
    copy = 4 if config.method == "qlora" or config.p != 4 else 0
    return max((copy * i * o + 12 * o * config.rank for _, i, o in adapted_modules(arch, config)), default=0)


def transient_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Short-lived buffers of one layer's backward: layer_backward_transient_bytes, plus, with QLoRA,
    one dequantized weight (the largest linear, in p bytes) per 4-bit matmul, plus dora_norm_bytes
    (in the forward, and in backward's recomputation with checkpointing; counted here as a bound)."""
    transient = layer_backward_transient_bytes(arch, config)
    if config.method == "qlora":
        transient += max(i * o for _, i, o in arch.linear_modules()) * config.p  # one dequantized weight
    return transient + dora_norm_bytes(arch, config)


# ----------------------------------------------------------------------------------------------
# Start-up: PiSSA's SVDs (initialisation.pissa, once per adapted linear, before the first step)


def pissa_svd_shapes(arch: Architecture, config: PlanConfig) -> tuple[tuple[int, int, int], ...]:
    """((out, in, count), ...): the weights init "pissa" decomposes, each adapted linear of every
    layer (count = L per linear of a layer with that shape), largest first; () for other inits."""
    if config.init != "pissa" or config.method == "full":
        return ()
    counts: dict[tuple[int, int], int] = {}
    for _, n_in, n_out in adapted_modules(arch, config):
        counts[(n_out, n_in)] = counts.get((n_out, n_in), 0) + arch.num_layers
    return tuple(sorted(((o, i, c) for (o, i), c in counts.items()), key=lambda s: (-s[0] * s[1], -s[0])))


def qr_flops(rows: int, cols: int) -> int:
    """Householder QR of a tall rows x cols matrix with its thin Q: 2c²(m - c/3) for R and as much
    again to form Q (Golub & Van Loan, "Matrix Computations", 5.2): 4mc² - 4c³/3."""
    return (12 * rows * cols**2 - 4 * cols**3) // 3


def svd_flops(rows: int, cols: int, rank: int, niter: int | None = None) -> int:
    """Floating-point operations of the top-`rank` singular triplets of a rows x cols matrix, as
    initialisation.top_singular computes them. With M = max(rows, cols), N = min(rows, cols) (the SVD
    of the transpose costs the same):

    full SVD (torch.linalg.svd, thin U and V): the R-SVD's count (Golub & Van Loan, 8.6):
        6 M N² + 20 N³
    randomized (torch.svd_lowrank, q = rank, `niter` subspace iterations; Halko et al. 2011, as torch
    runs it on the tall orientation): 2 + 2·niter products of the matrix with an N x q or M x q
    block, 1 + niter QRs of M x q and niter of N x q, the full SVD of the q x N block, U = Q U_B:
        (2 + 2·niter) · 2MNq + (1 + niter) qr(M, q) + niter qr(N, q) + 6Nq² + 20q³ + 2Mq²
    An operation count, not a time: LAPACK's divide and conquer (gesdd) and the machine's BLAS set
    the seconds."""
    m, n = max(rows, cols), min(rows, cols)
    if niter is None:
        return 6 * m * n**2 + 20 * n**3
    q = rank
    return ((2 + 2 * niter) * 2 * m * n * q + (1 + niter) * qr_flops(m, q) + niter * qr_flops(n, q)
            + 6 * n * q**2 + 20 * q**3 + 2 * m * q**2)


def pissa_init_flops(arch: Architecture, config: PlanConfig) -> int:
    """Σ over pissa_svd_shapes of count · (svd_flops(out, in, r, pissa_niter) + 2·out·in·r + out·in):
    the SVD, then the residual W - (scale·B) A (a product and a subtraction); 0 for other inits."""
    return sum(c * (svd_flops(o, i, config.rank, config.pissa_niter) + 2 * o * i * config.rank + o * i)
               for o, i, c in pissa_svd_shapes(arch, config))


def pissa_init_bytes(arch: Architecture, config: PlanConfig) -> int:
    """Memory initialisation.pissa allocates on top of the weights for the largest weight it
    decomposes (out x in = m x n, k = min(m, n), r the rank), all float32 (4 bytes):

      full SVD     torch.linalg.svd copies W for LAPACK (4mn), returns U (m x k), S and Vᵀ (k x n):
                   k(m + n) = mn + k² elements, so  8mn + 4k² + 4k  (measured on the CPU allocator
                   within 14 KiB, LAPACK's own small buffers: tests/test_planner_adapters.py);
                   the residual afterwards (below) is smaller
      randomized   its blocks are m x r and n x r; the peak is the residual W - (scale·B) A: the
                   product and the difference (8mn) while A and B are alive: 8mn + 4r(m + n)
      + 4mn        the float32 copy of W taken first, when the base is not float32

    These are CPU bytes in `lorakit train`: the adapters are initialised before the model moves to
    the device (training.setup.prepare_model, then loop). 0 for other inits."""
    shapes = pissa_svd_shapes(arch, config)
    if not shapes:
        return 0
    copy = 4 if config.p != 4 else 0

    def one(m: int, n: int) -> int:
        k, r = min(m, n), config.rank
        residual = 8 * m * n + 4 * r * (m + n)
        working = residual if config.pissa_niter is not None else max(8 * m * n + 4 * k * k + 4 * k, residual)
        return working + copy * m * n

    return max(one(o, i) for o, i, _ in shapes)


# ----------------------------------------------------------------------------------------------
# Sharding, the four moments, the runtime


def fsdp_gathered_bytes(arch: Architecture, config: PlanConfig) -> int:
    """With FSDP full sharding over N > 1 GPUs, what is unsharded on every rank:
      2 * (one layer's weights)           the layer computed and the one prefetched (all-gather)
      + one layer's weights in p bytes    full fine-tuning: its unsharded gradient before reduce-scatter
      + R - R/N                           the root (embeddings, final norm, head: R bytes) is gathered
                                          from the step's forward to the end of its backward
    0 for one GPU."""
    if config.n_gpus <= 1:
        return 0
    p, n = config.p, config.n_gpus
    layer_params = arch.layer_parameters()
    quantizable = arch.quantizable_layer_parameters()
    per_layer_weight = (quantizable // 2 + (layer_params - quantizable) * p
                        if config.method == "qlora" else layer_params * p)
    root_weight = (arch.embedding_parameters() + arch.hidden_size) * p
    full_grad = layer_params * p if config.method == "full" else 0
    return 2 * per_layer_weight + full_grad + root_weight - root_weight // n


def phase_bytes(arch: Architecture, config: PlanConfig) -> dict[str, int]:
    """Bytes allocated per GPU at each of the four moments of a steady-state step.

    With W = ceil((base + constants + adapters + states) / N) + fsdp_gathered (the persistent part),
    A = activations, G = ceil(grads / N), g = one layer's gradient per GPU, H = the head's gradient
    (full fine-tuning; it stays whole until the root's backward ends), x = T*h*p a checkpointed input:
      backward start   W + A + logits
      layer backward   max over k = 0..L-1 of W + H + (the activations of the L - k layers still to
                       go back through: L-k saved layers + head, or L-k checkpointed inputs + one
                       recomputed layer) + transient + k*g
      backward end     W + G (+ ceil(V*h*p / N) for the tied embedding's second gradient, full)
      optimizer step   W + G + ceil(optimizer_step / N)
    and, on the CPU with init "pissa", the moment before the first step (PISSA_PHASE):
      start-up         base + adapters + pissa_init_bytes   (whole weights: PiSSA needs them loaded)
    """
    p, n, t = config.p, config.n_gpus, config.tokens
    full = config.method == "full"
    layers = arch.num_layers
    grads = gradient_bytes(arch, config)
    persistent = math.ceil((base_weight_bytes(arch, config) + quant_constant_bytes(arch, config)
                            + adapter_weight_bytes(arch, config) + optimizer_state_bytes(arch, config)) / n) \
        + fsdp_gathered_bytes(arch, config)
    grads_shard = math.ceil(grads / n)
    head_grad = arch.vocab_size * arch.hidden_size * p if full else 0
    layer_grad = math.ceil(arch.layer_parameters() * p / n) if full else math.ceil(grads / layers / n)
    layer_acts = layer_activation_bytes(arch, config)
    head_acts = head_activation_bytes(arch, config)
    logits = loss_bytes(arch, config)
    transient = transient_bytes(arch, config)

    # Backward through the layers: after k of L layers, their grads exist and their activations are gone.
    phases = {}
    if config.grad_checkpointing:
        phases["backward start"] = persistent + checkpoint_input_bytes(arch, config) + head_acts + logits
        phases["layer backward"] = max(persistent + head_grad + (layers - k) * t * arch.hidden_size * p
                                       + layer_acts + transient + k * layer_grad for k in range(layers))
    else:
        phases["backward start"] = persistent + layers * layer_acts + head_acts + logits
        phases["layer backward"] = max(persistent + head_grad + head_acts + (layers - k) * layer_acts
                                       + transient + k * layer_grad for k in range(layers))
    tied_extra = math.ceil(arch.vocab_size * arch.hidden_size * p / n) if full and arch.tie_embeddings else 0
    phases["backward end"] = persistent + grads_shard + tied_extra
    phases["optimizer step"] = persistent + grads_shard + math.ceil(optimizer_step_bytes(arch, config) / n)
    if config.device == "cpu" and config.init == "pissa" and not full:
        # lorakit train runs PiSSA's SVDs where the weights are, before the first step: on the CPU
        # the same memory as the step (on CUDA, host memory: Plan.init_bytes, not a GPU moment)
        phases[PISSA_PHASE] = (base_weight_bytes(arch, config) + adapter_weight_bytes(arch, config)
                               + pissa_init_bytes(arch, config))
    return phases


def loss_bytes(arch: Architecture, config: PlanConfig) -> int:
    """The loss's term of the step: logits_bytes for SFT, preference_logits_bytes for DPO / ORPO."""
    return preference_logits_bytes(arch, config) if config.preference else logits_bytes(arch, config)


def runtime_overhead_bytes(config: PlanConfig, peak_allocated: int) -> int:
    """What torch.cuda.max_memory_allocated does not see, on CUDA: the CUDA context (~0.5 GiB),
    caching-allocator fragmentation (~5% of the allocated peak), NCCL buffers with FSDP (~0.5 GiB).
    0 on the CPU."""
    if config.device != "cuda":
        return 0
    return CUDA_CONTEXT_BYTES + int(FRAGMENTATION * peak_allocated) + (NCCL_BYTES if config.n_gpus > 1 else 0)


# ----------------------------------------------------------------------------------------------
# The plan


def predict(arch: Architecture, config: PlanConfig) -> Plan:
    """The memory of one training step of `arch` under a validated `config` (no recommendation)."""
    phases = phase_bytes(arch, config)
    peak_phase = max(phases, key=phases.get)
    peak_allocated = phases[peak_phase]
    overhead = runtime_overhead_bytes(config, peak_allocated)
    acts_no_ckpt = activation_bytes(arch, config, checkpointing=False)
    acts_ckpt = activation_bytes(arch, config, checkpointing=True)
    components = {
        "base_weights": base_weight_bytes(arch, config),
        "quant_constants": quant_constant_bytes(arch, config),
        "adapter_weights": adapter_weight_bytes(arch, config),
        "gradients": gradient_bytes(arch, config),
        "optimizer_states": optimizer_state_bytes(arch, config),
        "activations": acts_ckpt if config.grad_checkpointing else acts_no_ckpt,
        "logits_and_loss": loss_bytes(arch, config),
        "transient": max(transient_bytes(arch, config), optimizer_step_bytes(arch, config)),
        "runtime_overhead": overhead,
    }
    return Plan(arch=arch, config=config, total_params=arch.num_parameters(),
                trainable_params=trainable_parameters(arch, config),
                quantized_params=quantized_parameters(arch, config), components=components,
                activations_without_checkpointing=acts_no_ckpt, activations_with_checkpointing=acts_ckpt,
                phases=phases, peak_phase=peak_phase, peak_allocated=peak_allocated,
                runtime_overhead=overhead, peak=peak_allocated + overhead,
                init_svds=pissa_svd_shapes(arch, config), init_flops=pissa_init_flops(arch, config),
                init_bytes=pissa_init_bytes(arch, config))


def fits(plan_: Plan, gpu_gb: float, n_gpus: int = 1) -> bool:
    """Whether the step fits on n_gpus GPUs of gpu_gb GiB each (FSDP full sharding when n_gpus > 1)."""
    if n_gpus != plan_.config.n_gpus:
        config = replace(plan_.config, n_gpus=n_gpus)
        config.validate()
        plan_ = predict(plan_.arch, config)
    return plan_.peak <= gpu_gb * GiB
