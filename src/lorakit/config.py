"""LoRA configuration: one typed dataclass, validated in one place.

Field names follow the LoRA paper (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"); `to_peft_dict` / `from_peft_dict` translate to and from PEFT's `adapter_config.json`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dtypes import NAMES as DTYPES
from .patterns import pattern_problem

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("default", "gaussian", "random", "pissa", "olora", "loftq")
PARAMETER_INITS = ("default", "gaussian", "random")  # for target_parameters: inits that leave W as it is
ALL_LINEAR = "all-linear"

# Attention query and value projections per model family: the LoRA paper's recommended start
# (it adapts W_q and W_v). Names are transformers' module names.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
}


class ConfigError(ValueError):
    """Every problem found in a configuration, reported at once."""

    def __init__(self, what: str, problems: list[str]):
        self.problems = problems
        super().__init__(f"invalid {what}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class LoraConfig:
    """How to adapt a model: ΔW = (alpha / r) · B A with B: (out, r), A: (r, in).

    targets: a list of module names (a module matches when its full name equals an entry or ends
      with "." + entry), a regex string (full match on the full name), or "all-linear" (every linear
      layer except the output head). None picks the model family's default (query and value
      projections).
    exclude: same matching rules; excluded modules are never adapted.
    rslora: scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023, rank-stabilized LoRA).
    bias: which biases train as well: "none", "all", or "lora_only" (those of adapted layers).
    modules_to_save: modules trained in full (a trainable copy per adapter), e.g. a new head.
    layers: only adapt these layer indices (of the `layers_pattern` block list).
    rank_pattern / alpha_pattern: per-module overrides, {name-or-regex-suffix: value}.
    init: "default" (A Kaiming-uniform, B = 0: the model starts unchanged), "gaussian"
      (A ~ N(0, 1/r), B = 0), "random" (B Kaiming-uniform too: the model starts changed; for tests),
      or one that starts from the base weight and rewrites it to W - scale · B A (lorakit.initialisation):
      "pissa" (the top-r singular triplets, Meng et al. 2024), "olora" (QR, Büyükakyüz 2024),
      "loftq" (alternating 4-bit quantization and SVD of the residual, Li et al. 2023).
    pissa_niter: with init="pissa", None computes the full SVD; N uses a randomized SVD with N subspace
      iterations (peft's init_lora_weights="pissa_niter_N"; faster on large weights).
    loftq_iters: with init="loftq", the number of quantize / SVD alternations (peft's loftq_iter).
    dora: weight-decomposed LoRA (Liu et al. 2024, DoRA): W' = m ⊙ (W + ΔW) / ||W + ΔW||, a trained
      magnitude m per output (peft's use_dora).
    target_parameters: parameters to adapt directly (peft's target_parameters), e.g. a mixture-of-experts
      model's ["experts.gate_up_proj", "experts.down_proj"]: a parameter matches when its full name
      equals an entry or ends with "." + entry; a 3-D (experts, out, in) one gets one rank-r update per
      expert (layer.LoraParameter). With it, targets may be [] (no module). Plain LoRA only: no
      dropout, no DoRA, init default / gaussian / random (peft's rules for parameters).
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str | None = None
    exclude: list[str] | str | None = None
    rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    layers: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init: str = "default"
    pissa_niter: int | None = None
    loftq_iters: int = 1
    dora: bool = False
    target_parameters: list[str] | None = None
    task_type: str | None = "CAUSAL_LM"
    base_model: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, (tuple, set)):
            self.targets = sorted(self.targets)
        if isinstance(self.exclude, (tuple, set)):
            self.exclude = sorted(self.exclude)
        if isinstance(self.layers, int) and not isinstance(self.layers, bool):
            self.layers = [self.layers]
        if isinstance(self.modules_to_save, (tuple, set)):
            self.modules_to_save = list(self.modules_to_save)
        problems = self.problems()
        if problems:
            raise ConfigError("LoraConfig", problems)

    def problems(self) -> list[str]:
        """Every rule this config breaks (empty when valid)."""
        out = []
        if not _is_int(self.r) or self.r <= 0:
            out.append(f"r={self.r!r}: the rank must be an integer > 0 (typical: 8, 16, 32, 64)")
        if not _is_number(self.alpha) or self.alpha <= 0:
            out.append(f"alpha={self.alpha!r}: must be a number > 0 (typical: r or 2*r)")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            out.append(f"dropout={self.dropout!r}: must be in [0, 1)")
        if self.bias not in BIAS_MODES:
            out.append(f"bias={self.bias!r}: valid choices are {', '.join(BIAS_MODES)}")
        if self.init not in INIT_MODES:
            out.append(f"init={self.init!r}: valid choices are {', '.join(INIT_MODES)}")
        if self.pissa_niter is not None and (not _is_int(self.pissa_niter) or self.pissa_niter < 0):
            out.append(f"pissa_niter={self.pissa_niter!r}: must be an integer >= 0 (subspace iterations of "
                       "the randomized SVD; typical: 4 to 16), or None for the full SVD")
        elif self.pissa_niter is not None and self.init != "pissa":
            out.append(f"pissa_niter={self.pissa_niter!r} is set but init={self.init!r}: it applies to init='pissa' only")
        if not _is_int(self.loftq_iters) or self.loftq_iters <= 0:
            out.append(f"loftq_iters={self.loftq_iters!r}: must be an integer > 0 (typical: 1 to 5)")
        if not isinstance(self.dora, bool):
            out.append(f"dora={self.dora!r}: must be true or false")
        for key in ("targets", "exclude"):
            if not (key == "targets" and self.targets == [] and self.target_parameters):
                out += _module_spec_problems(key, getattr(self, key))
        out += self._target_parameters_problems()
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            out.append(f"modules_to_save={self.modules_to_save!r}: must be a list of module names")
        if self.layers is not None and not (
            isinstance(self.layers, list) and all(_is_int(i) and i >= 0 for i in self.layers)
        ):
            out.append(f"layers={self.layers!r}: must be a layer index >= 0 or a list of them")
        if self.layers_pattern is not None and not (
            isinstance(self.layers_pattern, str) or _is_str_list(self.layers_pattern)
        ):
            out.append(f"layers_pattern={self.layers_pattern!r}: must be a name or a list of names")
        if self.layers_pattern is not None and self.layers is None:
            out.append("layers_pattern is set but layers is not: give the layer indices to adapt")
        for key, value in _dict_items(self.rank_pattern, "rank_pattern", out):
            if not _is_int(value) or value <= 0:
                out.append(f"rank_pattern[{key!r}]={value!r}: ranks must be integers > 0")
            elif problem := pattern_problem(key):
                out.append(f"rank_pattern[{key!r}]: {problem}")
        for key, value in _dict_items(self.alpha_pattern, "alpha_pattern", out):
            if not _is_number(value) or value <= 0:
                out.append(f"alpha_pattern[{key!r}]={value!r}: alphas must be numbers > 0")
            elif problem := pattern_problem(key):
                out.append(f"alpha_pattern[{key!r}]: {problem}")
        return out

    def _target_parameters_problems(self) -> list[str]:
        if self.target_parameters is None:
            return []
        if not (_is_str_list(self.target_parameters) and self.target_parameters):
            return [f"target_parameters={self.target_parameters!r}: must be a non-empty list of parameter names, "
                    "e.g. ['experts.gate_up_proj', 'experts.down_proj']"]
        # An update of a weight cannot drop its inputs, nor rescale it by a norm: peft refuses these too.
        out = []
        if _is_number(self.dropout) and self.dropout > 0:
            out.append(f"dropout={self.dropout!r} with target_parameters: LoRA on parameters needs dropout 0 "
                       "(a weight's update cannot drop inputs)")
        if self.dora is True:
            out.append("dora=True with target_parameters: DoRA on parameters is not supported; use plain LoRA")
        if self.init not in PARAMETER_INITS and self.init in INIT_MODES:
            out.append(f"init={self.init!r} with target_parameters: valid choices are {', '.join(PARAMETER_INITS)}")
        return out

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """The rank and alpha of one module, after rank_pattern / alpha_pattern."""
        r = _pattern_value(self.rank_pattern, module_name, self.r)
        alpha = _pattern_value(self.alpha_pattern, module_name, self.alpha)
        return r, alpha

    def scaling(self, module_name: str) -> float:
        r, alpha = self.rank_and_alpha(module_name)
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def init_options(self) -> dict[str, int]:
        """The options of this config's initialiser (layer.LINEAR_INITS[init](layer, name, **options))."""
        if self.init == "pissa" and self.pissa_niter is not None:
            return {"niter": self.pissa_niter}
        return {"iters": self.loftq_iters} if self.init == "loftq" else {}

    def doubled_rank(self) -> LoraConfig:
        """The config of a rank-2r adapter with the same scale per module (alpha doubled, or times
        sqrt(2) with rslora), initialised the default way: what a PiSSA/OLoRA adapter converted for
        the original base is (adapter_io.save_adapter)."""
        factor = math.sqrt(2) if self.rslora else 2
        return self.replace(r=2 * self.r, alpha=factor * self.alpha, init="default", pissa_niter=None,
                            rank_pattern={k: 2 * v for k, v in self.rank_pattern.items()},
                            alpha_pattern={k: factor * v for k, v in self.alpha_pattern.items()})

    # --- PEFT's adapter_config.json -------------------------------------------------------------

    def to_peft_dict(self, resolved_targets: list[str] | None = None, fan_in_fan_out: bool = False) -> dict:
        """The fields of PEFT's LoraConfig that describe this adapter (sorted on write)."""
        targets = resolved_targets if resolved_targets is not None else self.targets
        return {
            "alpha_pattern": dict(self.alpha_pattern),
            "base_model_name_or_path": self.base_model,
            "bias": self.bias,
            "exclude_modules": self.exclude,
            "fan_in_fan_out": fan_in_fan_out,
            "inference_mode": True,
            "init_lora_weights": self._peft_init(),
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers,
            "lora_alpha": self.alpha,
            "lora_bias": False,
            "lora_dropout": self.dropout,
            **({"loftq_config": {"loftq_bits": 4, "loftq_iter": self.loftq_iters}} if self.init == "loftq" else {}),
            "modules_to_save": self.modules_to_save,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": dict(self.rank_pattern),
            "target_modules": targets,
            "task_type": self.task_type,
            "use_dora": self.dora,
            "use_rslora": self.rslora,
            **({"target_parameters": list(self.target_parameters)} if self.target_parameters else {}),
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> LoraConfig:
        """Read PEFT's adapter_config.json; refuse features lorakit does not implement."""
        problems = []
        if d.get("peft_type", "LORA") != "LORA":
            problems.append(f"peft_type={d.get('peft_type')!r}: lorakit loads LORA adapters only")
        for key in ("lora_bias", "use_qalora"):
            if d.get(key):
                problems.append(f"{key}={d[key]!r}: not supported by lorakit (only plain LoRA)")
        for key in ("layer_replication", "trainable_token_indices"):
            if d.get(key):
                problems.append(f"{key}={d[key]!r}: not supported by lorakit")
        init, niter = _init_from_peft(d.get("init_lora_weights", True), problems)
        if problems:
            raise ConfigError("adapter_config.json", problems)
        loftq = d.get("loftq_config") or {}
        return cls(
            r=d.get("r", 8),
            alpha=d.get("lora_alpha", 8),
            dropout=d.get("lora_dropout", 0.0),
            # peft: target_modules [] (or none) with target_parameters adapts the parameters only
            targets=[] if d.get("target_parameters") and not d.get("target_modules") else d.get("target_modules"),
            exclude=d.get("exclude_modules"),
            rslora=bool(d.get("use_rslora", False)),
            bias=d.get("bias", "none"),
            modules_to_save=d.get("modules_to_save"),
            layers=d.get("layers_to_transform"),
            layers_pattern=d.get("layers_pattern"),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
            init=init,
            pissa_niter=niter,
            loftq_iters=loftq.get("loftq_iter", 1) if isinstance(loftq, dict) else 1,
            dora=bool(d.get("use_dora", False)),
            target_parameters=d.get("target_parameters") or None,
            task_type=d.get("task_type"),
            base_model=d.get("base_model_name_or_path"),
        )

    def replace(self, **changes: Any) -> LoraConfig:
        return dataclasses.replace(self, **changes)

    def _peft_init(self):
        """peft's init_lora_weights for this config's init (and pissa_niter)."""
        if self.init == "pissa" and self.pissa_niter is not None:
            return f"pissa_niter_{self.pissa_niter}"
        return {"default": True, "random": False}.get(self.init, self.init)


def _init_from_peft(value, problems: list[str]) -> tuple[str, int | None]:
    """lorakit's (init, pissa_niter) for peft's init_lora_weights; a problem when lorakit lacks it."""
    if value is True or value is None:
        return "default", None
    if value is False:
        return "random", None
    if isinstance(value, str) and (m := re.fullmatch(r"pissa_niter_(\d+)", value)):
        return "pissa", int(m.group(1))
    if value in ("gaussian", "pissa", "olora", "loftq"):
        return value, None
    problems.append(f"init_lora_weights={value!r}: not supported by lorakit; supported: true, false, "
                    "'gaussian', 'pissa', 'pissa_niter_N', 'olora', 'loftq'")
    return "default", None


def _pattern_value(patterns: dict, module_name: str, default):
    # PEFT's rule: a key matches a module whose full name ends with it (as a regex), at a dot boundary.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _module_spec_problems(key: str, value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        if value == ALL_LINEAR:
            return []
        problem = pattern_problem(value)  # invalid, or may backtrack without end on a module name
        return [f"{key}={value!r}: {problem}"] if problem else []
    if _is_str_list(value) and value:
        return []
    return [f"{key}={value!r}: must be a non-empty list of module names, a regex string, or '{ALL_LINEAR}'"]


def _dict_items(value, name: str, out: list[str]):
    if not isinstance(value, dict):
        out.append(f"{name}={value!r}: must be a mapping of module name to value")
        return []
    return value.items()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_str_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# --- A training run: lorakit train's configuration ---------------------------------------------
#
# Grouped by concern, as in the YAML file and in `--set group.key=value` overrides. Every value
# is checked by `RunConfig.problems()` (types, ranges, choices, cross-field rules) before any model
# is loaded, and every problem is reported at once.

METHODS = ("lora", "qlora", "full")
DATA_FORMATS = ("auto", "prompt_completion", "alpaca", "chat", "sharegpt", "text", "preference")
# data.columns maps these keys of the formats to a file's own field names
COLUMN_KEYS = ("prompt", "completion", "answer", "instruction", "input", "output", "messages", "conversations",
               "text", "chosen", "rejected")
MAX_LENGTH_AUTO_CAP = 2048           # data.max_length "auto": the longest example, at most this
DEFAULT_STEPS = 30                   # train.steps when neither train.steps nor train.epochs is given
DEFAULT_MAX_NEW_TOKENS = 12          # eval.max_new_tokens when no test reference derives it
# What a step minimises (training.objectives): supervised fine-tuning, or a preference objective
# over (prompt, chosen, rejected) pairs: DPO (Rafailov et al. 2023) or ORPO (Hong et al. 2024).
OBJECTIVES = ("sft", "dpo", "orpo")
PREFERENCE_OBJECTIVES = ("dpo", "orpo")
PREFERENCE_LOSSES = ("sigmoid", "ipo")
SCHEDULES = ("cosine", "linear", "constant")
REPORT_TO = ("tensorboard", "mlflow")  # train.report_to: trackers written besides metrics.jsonl
BUILTIN_PREFIX = "builtin:"


@dataclass
class ModelSection:
    path: str | None = None          # local transformers directory (or hub id); None: SmolLM2-135M-Instruct
    dtype: str = "float32"           # dtype of the frozen base (with method qlora: of its non-4-bit parts)

    choices = {"dtype": DTYPES}


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: list[str] | str | None = "all-linear"
    exclude: list[str] | str | None = None
    rslora: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init: str = "default"
    pissa_niter: int | None = None   # init pissa: None, the full SVD; N, a randomized SVD with N iterations
    loftq_iters: int = 1             # init loftq: quantize / SVD alternations
    dora: bool = False               # weight-decomposed LoRA (DoRA)
    target_parameters: list[str] | None = None  # parameters adapted directly (peft's), e.g. [experts.gate_up_proj]

    choices = {"bias": BIAS_MODES, "init": INIT_MODES}

    def lora_config(self, base_model: str | None = None) -> LoraConfig:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return LoraConfig(**fields, base_model=base_model)


@dataclass
class DataSection:
    train: str = "builtin:stardate"   # a .jsonl/.json/.csv/.parquet file, hf:DIR-or-NAME[:split], or builtin:<task>
    test: str | None = None           # held-out file scored by exact match (builtin tasks bring one)
    validation: str | None = None     # a file, or None to split off `validation_fraction` of train
    validation_fraction: float = 0.05
    format: str = "auto"
    max_length: int | str = 64        # tokens per example; "auto": the longest training example (at most 2048)
    packing: bool = False             # whole examples in rows of max_length, attention kept within each example
    group_by_length: bool = False     # batches of examples of similar length (less padding; data.grouped_batches)
    padding_free: bool = False        # each micro-batch's examples in one row, attention kept within each example:
                                      # the batches and loss of padded training, no padding (trl's padding_free)
    train_on_inputs: bool = False     # False: prompt tokens carry no loss
    n_train: int | None = None        # builtin tasks: number of training examples
    n_test: int | None = None         # builtin tasks: number of test examples
    columns: dict[str, str] | None = None  # {format key: the file's field}, e.g. {prompt: question, completion: answer}
    max_leakage: float | None = None  # test/validation share also in train above which the data check stops a run (None: 0.01)

    choices = {"format": DATA_FORMATS}

    def problems(self) -> list[str]:
        """The rules of this group that are not a type or a choice."""
        out = []
        if isinstance(self.max_length, str) and self.max_length != "auto":
            out.append(f"data.max_length={self.max_length!r}: a number of tokens, or 'auto' (the longest "
                       f"training example, at most {MAX_LENGTH_AUTO_CAP})")
        if self.columns is not None:
            if not (isinstance(self.columns, dict) and self.columns
                    and all(isinstance(k, str) and isinstance(v, str) for k, v in self.columns.items())):
                out.append(f"data.columns={self.columns!r}: must map format keys to the file's field names, "
                           "e.g. {prompt: question, completion: answer}")
            else:
                unknown = [k for k in self.columns if k not in COLUMN_KEYS]
                if unknown:
                    out.append(f"data.columns: unknown key(s) {', '.join(map(repr, unknown))}; the formats' keys "
                               f"are {', '.join(COLUMN_KEYS)}")
                if len(set(self.columns.values())) < len(self.columns):
                    out.append(f"data.columns={self.columns!r}: two keys map to the same field")
        if self.packing is True and self.group_by_length is True:
            out.append("data.group_by_length=true with data.packing=true: packed rows are already about "
                       "max_length tokens each, there is nothing to group; choose one (packing: exact and "
                       "no padding; group_by_length: cheaper, some padding)")
        if _is_number(self.max_leakage) and not 0 <= self.max_leakage <= 1:
            out.append(f"data.max_leakage={self.max_leakage}: a fraction in [0, 1] (1: never an error)")
        return out


@dataclass
class TrainSection:
    steps: int | None = None         # optimizer steps (30 when epochs is not given either)
    epochs: float | None = None      # or: passes over the training data; the steps follow (rounded up)
    batch_size: int = 16             # examples per micro-batch per rank
    grad_accum: int = 1
    lr: float = 2e-3
    schedule: str = "cosine"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    loraplus_ratio: float | None = None  # LoRA+: the B matrices learn at lr × ratio (typical: 16); None: off
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    compile: bool = False            # torch.compile each decoder block for the steps (pays back after ~50 steps)
    seed: int = 0
    log_every: int = 1
    save_every: int = 10
    threads: int | None = None       # torch CPU threads; None: torch's default
    device: str = "auto"             # auto: CUDA when available (one GPU per rank under torchrun), else CPU
    strategy: str = "ddp"            # several ranks: ddp (replicate, average gradients) or fsdp (shard)
    dist_timeout_s: float = 600      # a collective waiting longer than this fails the run
    report_to: list[str] = field(default_factory=list)  # trackers besides metrics.jsonl: tensorboard, mlflow

    choices = {"schedule": SCHEDULES, "device": ("auto", "cpu", "cuda"), "strategy": ("ddp", "fsdp")}

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs is None:
            self.steps = DEFAULT_STEPS

    def problems(self) -> list[str]:
        """The rules of this group that are not a type or a choice."""
        out = []
        unknown = [r for r in self.report_to if r not in REPORT_TO] if isinstance(self.report_to, list) else []
        if unknown:
            out.append(f"train.report_to={self.report_to!r}: unknown tracker(s) {', '.join(map(repr, unknown))}; "
                       f"valid choices are {', '.join(REPORT_TO)} (metrics.jsonl is always written)")
        if self.epochs is None:
            return out
        if self.steps is not None:
            return out + [f"train.steps={self.steps} and train.epochs={self.epochs}: give one of them (steps: "
                    "optimizer steps; epochs: passes over the training data, from which the steps follow)"]
        if _is_number(self.epochs) and self.epochs <= 0:
            return out + [f"train.epochs={self.epochs}: must be > 0 (e.g. 1, 3, or 0.5 for half the data)"]
        return out


@dataclass
class EvalSection:
    every: int = 10                  # held-out loss every N steps (0: only before and after)
    generate: bool = True            # exact match on the test split before and after training
    max_new_tokens: int | None = None  # None: the longest test reference + 2 tokens (data.derive_max_new_tokens)
    batch_size: int = 32
    limit: int | None = None         # score only the first N test examples
    # retention (forgetting) monitor, off by default (it costs a generation before training and one
    # forward per evaluation): true scores the base model's own greedy answers to built-in neutral
    # prompts, a path scores that file's records; logged as retention_kl, KL(base || tuned) per token
    retention: bool | str = False
    retention_threshold: float = 0.1  # nats per token: above it, the run is diagnosed as forgetting

    def problems(self) -> list[str]:
        """The rules of this group that are not a type."""
        if _is_number(self.retention_threshold) and self.retention_threshold <= 0:
            return [f"eval.retention_threshold={self.retention_threshold}: must be > 0 (nats per token; typical: 0.1)"]
        if isinstance(self.retention, str) and not self.retention.strip():
            return ["eval.retention='': give a file of records, true (the base model's own answers to neutral "
                    "prompts) or false (off)"]
        return []


@dataclass
class PreferenceSection:
    """The preference objectives' settings (objective dpo or orpo; training.objectives has the formulas)."""

    beta: float = 0.1                # dpo: how far the policy may move from the reference (IPO: its tau)
    loss: str = "sigmoid"            # dpo: sigmoid (the DPO paper's) or ipo (Azar et al. 2023)
    label_smoothing: float = 0.0     # dpo sigmoid: the fraction of pairs assumed flipped (conservative DPO)
    orpo_lambda: float = 0.1         # orpo: the weight of the odds-ratio term added to the chosen NLL

    choices = {"loss": PREFERENCE_LOSSES}


@dataclass
class RunConfig:
    method: str = "lora"
    objective: str = "sft"
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)

    choices = {"method": METHODS, "objective": OBJECTIVES}
    SECTIONS = ("model", "lora", "data", "train", "eval", "preference")

    def problems(self) -> list[str]:
        out = [f"method={self.method!r}: valid choices are {', '.join(METHODS)}"] \
            if self.method not in METHODS else []
        if self.objective not in OBJECTIVES:
            out.append(f"objective={self.objective!r}: valid choices are {', '.join(OBJECTIVES)}")
        for name in self.SECTIONS:
            out += _section_problems(name, getattr(self, name))
            out += getattr(self, name).problems() if hasattr(getattr(self, name), "problems") else []
        if not out:
            try:
                self.lora.lora_config()
            except ConfigError as e:
                out += [f"lora: {p}" for p in e.problems]
        d, t, e = self.data, self.train, self.eval
        positive = [("data.max_length", d.max_length), ("train.steps", t.steps),
                    ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                    ("train.log_every", t.log_every), ("train.save_every", t.save_every),
                    ("eval.max_new_tokens", e.max_new_tokens), ("eval.batch_size", e.batch_size),
                    ("data.n_train", d.n_train), ("data.n_test", d.n_test), ("eval.limit", e.limit),
                    ("train.threads", t.threads)]
        for key, value in positive:
            if _is_int(value) and value <= 0:
                out.append(f"{key}={value}: must be > 0")
        for key, value in (("train.lr", t.lr), ("train.weight_decay", t.weight_decay),
                           ("train.warmup_steps", t.warmup_steps), ("train.seed", t.seed),
                           ("train.dist_timeout_s", t.dist_timeout_s),
                           ("eval.every", e.every), ("train.max_grad_norm", t.max_grad_norm)):
            if _is_number(value) and value < 0:
                out.append(f"{key}={value}: must be >= 0")
        if _is_number(t.lr) and t.lr == 0:
            out.append("train.lr=0: must be > 0")
        if _is_number(t.loraplus_ratio) and t.loraplus_ratio <= 0:
            out.append(f"train.loraplus_ratio={t.loraplus_ratio}: must be > 0 (typical: 16), or null for off")
        if self.method == "full" and t.loraplus_ratio is not None:
            out.append(f"train.loraplus_ratio={t.loraplus_ratio} with method=full: LoRA+ sets the learning rate "
                       "of LoRA's B matrices, which full fine-tuning does not have; leave it unset")
        if self.method == "qlora" and self.lora.init in ("pissa", "olora"):
            out.append(f"lora.init={self.lora.init!r} with method=qlora: it moves the principal part of each "
                       "weight into the adapter, and the 4-bit residual plus the initial adapter is not the 4-bit "
                       "original, so the saved adapter could not reproduce the trained model; use method=lora, "
                       "or lora.init=loftq (made for a 4-bit base)")
        if self.method != "qlora" and self.lora.init == "loftq":
            out.append(f"lora.init='loftq' with method={self.method}: LoftQ initialises the adapters of a 4-bit "
                       "base; use method=qlora")
        out += self._compile_problems()
        if _is_number(d.validation_fraction) and not 0 <= d.validation_fraction < 1:
            out.append(f"data.validation_fraction={d.validation_fraction}: must be in [0, 1)")
        for key in ("train", "test", "validation"):
            value = getattr(d, key)
            if isinstance(value, str) and value.startswith(BUILTIN_PREFIX):
                from .tasks import TASKS

                task = value[len(BUILTIN_PREFIX):]
                if task not in TASKS:
                    out.append(f"data.{key}={value!r}: unknown built-in task; valid: "
                               + ", ".join(BUILTIN_PREFIX + k for k in TASKS))
        return out + self._objective_problems()

    def _compile_problems(self) -> list[str]:
        """train.compile outside what it is tested with (tests/test_train_compile.py): method lora,
        objective sft, no DoRA, no gradient checkpointing. One process only: the number of ranks is
        known once the run starts (training.setup.check_compile)."""
        if self.train.compile is not True:
            return []
        off = "or set train.compile=false"
        checks = [(self.method != "lora", f"method={self.method!r}", f"use method=lora {off}"),
                  (self.objective != "sft", f"objective={self.objective!r}", f"use objective=sft {off}"),
                  (self.lora.dora is True, "lora.dora=true", f"set lora.dora=false {off}"),
                  (self.train.gradient_checkpointing is True, "train.gradient_checkpointing=true",
                   f"set train.gradient_checkpointing=false {off}")]
        return [f"train.compile=true with {what}: compiled decoder blocks are supported with method=lora, "
                f"objective=sft, lora.dora=false and train.gradient_checkpointing=false only; {fix}"
                for bad, what, fix in checks if bad]

    def _objective_problems(self) -> list[str]:
        """The preference group's ranges and what an objective asks of the method, the adapters and the data."""
        p, out = self.preference, []
        if _is_number(p.beta) and p.beta <= 0:
            out.append(f"preference.beta={p.beta}: must be > 0 (typical: 0.1; higher keeps the policy closer "
                       "to the reference)")
        if _is_number(p.label_smoothing) and not 0 <= p.label_smoothing < 0.5:
            out.append(f"preference.label_smoothing={p.label_smoothing}: must be in [0, 0.5) (the fraction of "
                       "pairs assumed flipped; typical: 0 or 0.1)")
        elif _is_number(p.label_smoothing) and p.label_smoothing > 0 and p.loss != "sigmoid":
            out.append(f"preference.label_smoothing={p.label_smoothing} with preference.loss={p.loss!r}: label "
                       "smoothing applies to loss 'sigmoid' only; set it to 0")
        if _is_number(p.orpo_lambda) and p.orpo_lambda < 0:
            out.append(f"preference.orpo_lambda={p.orpo_lambda}: must be >= 0 (typical: 0.1)")
        if self.objective == "dpo" and self.method == "full":
            out.append("objective='dpo' with method='full': DPO needs a frozen reference model, and lorakit takes "
                       "it from the same network with the adapters disabled (no second copy of the weights); full "
                       "fine-tuning has no adapters to disable: use method=lora or method=qlora, or "
                       "objective=orpo (reference-free)")
        if self.objective == "dpo" and self.method != "full" and self.lora.init in ("pissa", "olora", "loftq"):
            out.append(f"objective='dpo' with lora.init={self.lora.init!r}: DPO's reference is the model with "
                       "its adapters disabled, and this initialisation rewrites the base weight (W - scale·B₀A₀), "
                       "so that is not the model training starts from: use lora.init=default or gaussian")
        if self.objective == "dpo" and self.method != "full" and self.lora.bias != "none":
            out.append(f"objective='dpo' with lora.bias={self.lora.bias!r}: DPO's reference is the model with its "
                       "adapters disabled, but trained biases change the base in place, so the reference would "
                       "move with training: use lora.bias=none")
        if self.objective in PREFERENCE_OBJECTIVES and self.data.format not in ("auto", "preference"):
            out.append(f"objective={self.objective!r} with data.format={self.data.format!r}: a preference "
                       "objective trains on (prompt, chosen, rejected) records: use data.format=preference or auto")
        if self.objective == "sft" and self.data.format == "preference":
            out.append("data.format='preference' with objective='sft': preference records train with "
                       f"objective={' or '.join(PREFERENCE_OBJECTIVES)}")
        if self.objective in PREFERENCE_OBJECTIVES and self.data.packing is True:
            out.append(f"data.packing=true with objective={self.objective!r}: a preference pair is two whole "
                       "sequences compared with each other, they cannot be packed: set data.packing=false")
        if self.objective in PREFERENCE_OBJECTIVES and self.data.padding_free is True:
            out.append(f"data.padding_free=true with objective={self.objective!r}: preference pairs are collated "
                       "padded (each sequence's log-probability is read from its own row): set data.padding_free=false")
        return out

    @property
    def quantize(self) -> str | None:
        """How the frozen base is stored: "nf4" (4-bit NormalFloat) for QLoRA, else None. The method
        is the one place this is decided."""
        return "nf4" if self.method == "qlora" else None

    def validate(self) -> RunConfig:
        problems = self.problems()
        if problems:
            raise ConfigError("run configuration", problems)
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "objective": self.objective,
                **{s: dataclasses.asdict(getattr(self, s)) for s in self.SECTIONS}}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
        """Build from a nested dict (a YAML file) plus "group.key=value" overrides (values parsed as
        YAML scalars). Unknown keys and bad values are collected and raised together."""
        problems: list[str] = []
        raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
        for item in overrides:
            key, sep, text = item.partition("=")
            if not sep:
                problems.append(f"--set {item!r}: expected key=value, e.g. lora.r=32")
                continue
            try:
                value = load_yaml(text) if text != "" else None
            except ValueError as e:
                problems.append(f"--set {item!r}: cannot parse the value ({e})")
                continue
            group, dot, name = key.partition(".")
            if dot:
                section = raw.setdefault(group, {})
                if isinstance(section, dict):
                    section[name] = value
                else:
                    problems.append(f"--set {item!r}: {group} is not a group")
            else:
                raw[group] = value
        problems += _retired_quantize(raw)
        kwargs: dict[str, Any] = {}
        sections = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in raw.items():
            if key not in sections:
                problems.append(f"unknown key {key!r}: valid top-level keys are {', '.join(sections)}")
            elif key in ("method", "objective"):
                kwargs[key] = value
            elif not isinstance(value, dict):
                problems.append(f"{key}: expected a group of keys, got {value!r}")
            else:
                section_cls = type(sections[key].default_factory())
                valid = [f.name for f in dataclasses.fields(section_cls)]
                unknown = [k for k in value if k not in valid]
                for k in unknown:
                    problems.append(f"unknown key {key}.{k}: valid keys in {key} are {', '.join(valid)}")
                kwargs[key] = section_cls(**{k: v for k, v in value.items() if k in valid})
        config = cls(**kwargs)
        problems += config.problems()
        if problems:
            raise ConfigError("run configuration", problems)
        return config


def _retired_quantize(raw: dict[str, Any]) -> list[str]:
    """`model.quantize` repeated what `method` says (nf4 exactly for qlora). Configs written before it
    was retired (run directories' config.yaml included) still load: the key is dropped when it agrees
    with the method, and a contradiction is reported, as it always was."""
    model = raw.get("model")
    if not isinstance(model, dict) or "quantize" not in model:
        return []
    value, method = model.pop("quantize"), raw.get("method", "lora")
    if value in (None, "none") or (value == "nf4" and method == "qlora"):
        return []
    if value == "nf4":
        return [f"method={method!r} with model.quantize='nf4': the 4-bit base is method=qlora's; "
                "set method=qlora (model.quantize is implied by the method and can be left out)"]
    return [f"model.quantize={value!r}: model.quantize is implied by the method (nf4 exactly for "
            "method=qlora) and can be left out; valid values were none and nf4"]


def read_yaml_file(path: str | os.PathLike):
    """The YAML document in `path` (config.load_yaml's rules); ValueError naming the file when it is
    not UTF-8 or not valid YAML."""
    path = Path(path)
    try:
        return load_yaml(path.read_text(encoding="utf-8"))
    except ValueError as e:  # bad YAML, a duplicate key, an alias bomb, text that is not UTF-8
        raise ValueError(f"{path}: {e}") from None


def read_run_config(path: str | os.PathLike | None, overrides: Sequence[str] = (),
                    settings: Mapping[str, object] | None = None) -> RunConfig:
    """The RunConfig of `lorakit train [CONFIG.yaml] [--set ...]`: the YAML file at `path` (None: no
    file), then `settings` ({"lora.r": 16, ...}: values set over the file's), then the --set
    `overrides`, all checked by RunConfig.from_dict (every problem at once, as ConfigError)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        raw = read_yaml_file(path) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of groups (model, lora, data, train, eval)")
    for key, value in (settings or {}).items():
        group, dot, name = key.partition(".")
        if not dot:
            raw[group] = value
        elif isinstance(raw.setdefault(group, {}), dict):
            raw[group] = {**raw[group], name: value}
        # else: the file's group is not a mapping; from_dict reports it
    return RunConfig.from_dict(raw, list(overrides))


# More values than this after expanding YAML aliases is refused: a few lines of nested aliases
# ("billion laughs") would otherwise expand to billions of values when the config is checked.
MAX_YAML_VALUES = 100_000


def load_yaml(text: str):
    """yaml.safe_load, except that 1e-4 is a float (YAML 1.1 wants 1.0e-4 and reads "1e-4" as a
    string, a trap for learning rates), a key given twice in one mapping is an error (YAML keeps
    the last silently), and aliases may not expand to more than MAX_YAML_VALUES values."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first_line: dict[str, int] = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if key.value in first_line:
                        raise ValueError(f"line {line}: duplicate key {key.value!r} (first given at line "
                                         f"{first_line[key.value]}); give each key once")
                    first_line[key.value] = line
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, set()) > MAX_YAML_VALUES:
            raise ValueError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values, more than a "
                             "configuration may hold (an alias bomb?); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ValueError(str(e)) from e
    except RecursionError as e:
        raise ValueError("it is nested too deeply to read") from e
    finally:
        loader.dispose()


def _expanded_size(node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values `node` stands for once every alias is replaced by a copy of its anchor
    (an alias is the same node object, so each distinct node is counted once, in linear time)."""
    import yaml

    key = id(node)
    if key in open_nodes:
        raise ValueError(f"line {node.start_mark.line + 1}: an alias refers to a value that contains it "
                         "(a recursive alias); write the values out")
    if key not in sizes:
        open_nodes.add(key)
        children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) \
            else node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total += _expanded_size(child, sizes, open_nodes)
            if total > MAX_YAML_VALUES:
                break  # enough to refuse; do not add up astronomically large numbers
        sizes[key] = total
        open_nodes.discard(key)
    return sizes[key]


def _section_problems(section: str, obj) -> list[str]:
    """Type and choice checks for every field of one config group."""
    import typing

    out = []
    hints = typing.get_type_hints(type(obj))
    choices = getattr(obj, "choices", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            out.append(f"{section}.{f.name}={value!r}: expected {_type_name(hints[f.name])}")
        elif f.name in choices and value not in choices[f.name]:
            out.append(f"{section}.{f.name}={value!r}: valid choices are {', '.join(choices[f.name])}")
    return out


def _type_ok(value, hint) -> bool:
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_name(hint) -> str:
    name = getattr(hint, "__name__", None) if not hasattr(hint, "__args__") else None
    return name or str(hint).replace("typing.", "").replace("NoneType", "null")
