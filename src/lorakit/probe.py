"""The convergence probe (`lorakit probe`): does LoRA train like full fine-tuning on this data?

The LoRA literature's advice is that LoRA should converge about as full fine-tuning does, and
that clearly worse convergence means the rank is too low or the learning rate too high. The
probe runs that comparison: a short full fine-tuning reference and the configured LoRA/QLoRA run
on identical batches (same data, seed and order: data.batch_at makes a step's batch a pure
function of the step; every run's token ids are recorded and compared), through the training
loop itself (training.train, in temporary run directories). Then:

  verdict         from the smoothed final training losses (monitor.smooth, its last value) of the
                  runs, which all start from the same step-1 loss L0 (a fresh adapter changes nothing).
                  Progress is counted in log loss, ln(L0 / final), so that 0.8 against 0.3 nats is a
                  lag even when both came down from 3: share = ln(L0 / final_lora) / ln(L0 / final_full)
                    1. the reference did not learn (diverged, or final_full > (1 - MIN_REFERENCE_PROGRESS) L0):
                       "inconclusive: the full fine-tuning reference did not learn"
                    2. the LoRA run diverged (the loop stopped it) or ends above L0: "diverges", with
                       ": learning rate too high" when a lower learning rate of the sweep trains
                    3. share >= 1 - LAG_TOLERANCE: "converges like full fine-tuning"
                    4. else it lags, and the sweep says why: a lower swept learning rate whose share
                       closes at least LR_CLOSES of the missing 1 - share: "lags: learning rate too
                       high"; a higher one: "lags: learning rate too low"; neither: "lags: rank too low"
  effective rank  of the reference's update ΔW = W_after - W_before of every module LoRA adapts:
                  the number of singular values holding ENERGY of ||ΔW||_F² (effective_rank),
                  summarised per module type (median, max over layers); the recommended rank is
                  the next power of two at or above the largest per-type median (recommended_rank)
  learning rate   the LoRA run at the configured lr x SWEEP_FACTORS. The advice ranks runs by their
                  held-out loss after training when the data has a validation split (else by the
                  smoothed final training loss, which lags the last steps): `score`. When the
                  recommended rank differs from the configured one, the best swept lr was found at the
                  wrong rank (with alpha / r fixed, the best lr falls as the rank rises: 3-10x from r=8
                  to r=128 in bench/probe_vs_grid.py), so the recommended rank is run at the best swept
                  lr x RANK_LR_FACTORS, alpha scaled to keep the configured scale; the recommendation is
                  the best scored (rank, alpha, lr) of every run made, at either rank.
                  It is set against the rule of thumb that LoRA's best learning rate is about
                  LORA_LR_RATIO x full fine-tuning's, whatever the rank (with alpha / r scaling)
  capacity        the adapters hold about CAPACITY_BITS_PER_PARAMETER bits per trainable parameter;
                  the data asks for about (supervised tokens) x (bits per token the reference learned);
                  more than the adapters hold: a warning (LoRA falls behind full fine-tuning when
                  the data is large for the rank). A rough upper bound: examples that repeat each
                  other teach less than their tokens' count
  memory          the planner's peak for full fine-tuning of this config (planner.plan_run, method
                  full), before any weight is read. When it does not fit the device, the reference
                  fine-tunes the LAST k decoder layers only (embeddings, head and the other layers
                  frozen), k the largest that fits (subset_plan), and every LoRA run adapts the same
                  layers (lora.exclude the rest): the comparison is made on them, and the report says
                  which (`layers`). When not even the last layer alone fits, the probe cannot run
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import monitor
from .config import ConfigError, RunConfig
from .files import write_atomically
from .inject import resolve_targets, trainable_parameters
from .surgery import layer_index
from .training import Prepared, train
from .training.output import probe_key, probe_record_path
from .training.objectives import Objective, objective_for
from .training.setup import load_base, load_data, prepare_model

DEFAULT_STEPS = 30                  # optimizer steps of each run
ENERGY = 0.9                        # effective rank: the share of ||ΔW||_F² the kept singular values hold
LAG_TOLERANCE = 0.2                 # LoRA may miss this share of the reference's (log) progress and converge
LR_CLOSES = 0.5                     # a swept learning rate is the cause of a lag when it closes this share of it
MIN_REFERENCE_PROGRESS = 0.05       # the reference must lower the loss by this share of L0 to compare against
# x the configured learning rate, besides the configured run itself: two decades below (a rate too
# high is the common failure, and runs far above the best one behave erratically, so the best of
# a few rates just below would not tell), half a decade above
SWEEP_FACTORS = (0.01, 0.03, 0.1, 0.3, 3.0)
FULL_LR_FACTOR = 0.1                # the reference's learning rate when not given: lr x this
RANK_LR_FACTORS = (0.1, 0.3, 1.0)   # x the best swept lr, run at the recommended rank (the best lr falls with rank)
LORA_LR_RATIO = 10.0                # rule of thumb: LoRA's best lr ~ this x full fine-tuning's
MAX_RECOMMENDED_RANK = 256
CAPACITY_BITS_PER_PARAMETER = 2.0   # what a trained parameter stores, as measured for language models

CONVERGES = "converges like full fine-tuning"
RANK_TOO_LOW = "rank too low"
LR_TOO_HIGH = "learning rate too high"
LR_TOO_LOW = "learning rate too low"


def effective_rank(delta: torch.Tensor, energy: float = ENERGY) -> int:
    """The number of singular values of ΔW (out, in) that hold `energy` of its energy ||ΔW||_F² = Σ σ_i²:
    the smallest k with σ_1² + ... + σ_k² >= energy · Σ σ_i² (σ in descending order); 0 for ΔW = 0.

    A rank-k ΔW with k equal singular values has effective rank ceil(energy · k): k up to 9 at 0.9,
    then fewer (18 for k = 20), since the last singular values add less than the 10% left out.
    """
    s2 = torch.linalg.svdvals(delta.detach().float()).double().pow(2)
    total = float(s2.sum())
    if total == 0:
        return 0
    # a share reached up to rounding counts as reached: 9 of 10 equal values hold exactly 0.9
    return int((torch.cumsum(s2, 0) < (energy - 1e-9) * total).sum()) + 1


def module_type(name: str) -> str:
    """"model.layers.3.self_attn.q_proj" -> "q_proj": what effective ranks are summarised by."""
    return name.rsplit(".", 1)[-1]


def update_ranks(before: dict[str, torch.Tensor], model: torch.nn.Module, energy: float = ENERGY) -> dict[str, dict]:
    """Per module type, the effective rank of ΔW = W_after - W_before of each of its layers (in model
    order), their median and max, and the largest rank a layer of the type can have (min(out, in))."""
    out: dict[str, dict] = {}
    with torch.no_grad():
        for name, w0 in before.items():
            w1 = model.get_submodule(name).weight
            entry = out.setdefault(module_type(name), {"ranks": [], "limit": min(w0.shape)})
            entry["ranks"].append(effective_rank(w1.float() - w0.to(w1.device).float(), energy))
    for entry in out.values():
        entry["median"], entry["max"] = statistics.median(entry["ranks"]), max(entry["ranks"])
    return out


def recommended_rank(ranks: dict[str, dict], cap: int = MAX_RECOMMENDED_RANK) -> int:
    """The next power of two at or above the largest per-type median effective rank, at most `cap` and
    at most the largest rank a targeted layer can have."""
    if not ranks:
        return 1
    need = max(entry["median"] for entry in ranks.values())
    limit = min(cap, max(entry["limit"] for entry in ranks.values()))
    return max(1, min(limit, 2 ** math.ceil(math.log2(max(need, 1)))))


class RecordingObjective:
    """An objective that keeps the token ids of every micro-batch it lays out, step by step, and
    otherwise is the objective it wraps: the record of what a run saw."""

    def __init__(self, inner: Objective):
        self.inner = inner
        self.batches: list[list[torch.Tensor]] = []   # per step: the input_ids of its micro-batches

    def micro_batches(self, *args, **kwargs) -> list[dict[str, torch.Tensor]]:
        batches = self.inner.micro_batches(*args, **kwargs)
        self.batches.append([b["input_ids"].clone() for b in batches])
        return batches

    def __getattr__(self, name: str):  # the rest of the Objective protocol: the wrapped one's
        return getattr(self.inner, name)


def batches_digest(batches: list[list[torch.Tensor]]) -> str:
    """SHA-256 over the token ids of every micro-batch, in order: equal digests, equal batches."""
    h = hashlib.sha256()
    for step in batches:
        for ids in step:
            h.update(str(tuple(ids.shape)).encode())
            h.update(ids.to(torch.int64).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Run:
    """One training run of the probe, as its loop logged it."""

    name: str
    method: str
    lr: float
    losses: list[float]           # training loss per step (1..), up to a divergence
    diverged: bool                # the loop stopped it (monitor.STOPPED)
    val_loss: float | None        # held-out loss after training
    batches: list[list[torch.Tensor]] = field(repr=False)

    @property
    def final(self) -> float:
        """The smoothed training loss at the last step; inf for a run that diverged."""
        return math.inf if self.diverged or not self.losses else monitor.smooth(self.losses)[-1]

    def to_dict(self) -> dict:
        return {"method": self.method, "lr": self.lr, "losses": self.losses, "diverged": self.diverged,
                "final_loss": None if math.isinf(self.final) else self.final, "val_loss": self.val_loss}


@dataclass
class Verdict:
    kind: str            # "converges", "lags", "diverges" or "inconclusive"
    cause: str | None    # RANK_TOO_LOW, LR_TOO_HIGH, LR_TOO_LOW or None
    reason: str          # the numbers behind it, in a sentence

    @property
    def text(self) -> str:
        if self.kind == "converges":
            return CONVERGES
        if self.kind == "inconclusive":
            return "inconclusive: the full fine-tuning reference did not learn"
        return self.kind + (f": {self.cause}" if self.cause else "")


def score(run: Run, held_out: bool) -> float:
    """What the advice ranks runs by: the held-out loss after training (held_out) or the smoothed
    final training loss; inf for a run that diverged or has no finite value."""
    value = run.val_loss if held_out else run.final
    return value if not run.diverged and value is not None and math.isfinite(value) else math.inf


def held_out_basis(runs: list[Run]) -> bool:
    """Whether the advice can rank `runs` by held-out loss: every run that trained to the end has one
    (a diverged run has none, and scores inf on either basis)."""
    finished = [r for r in runs if not r.diverged]
    return bool(finished) and all(r.val_loss is not None for r in finished)


def scaled_alpha(config: RunConfig, r: int) -> float:
    """lora.alpha for rank r that keeps the configured scale (alpha / r, or alpha / sqrt(r) with rslora)."""
    ratio = r / config.lora.r
    return config.lora.alpha * (math.sqrt(ratio) if config.lora.rslora else ratio)


def verdict(full: Run, lora: Run, sweep: list[Run]) -> Verdict:
    """The rule of the module docstring, on the runs' smoothed final losses. `sweep` holds the LoRA
    runs at other learning rates (the configured one, `lora`, may be among them)."""
    start = lora.losses[0] if lora.losses else full.losses[0] if full.losses else math.nan
    if full.diverged or not full.final <= (1 - MIN_REFERENCE_PROGRESS) * start:
        return Verdict("inconclusive", None, f"the full fine-tuning reference (lr {full.lr:.3g}) went from "
                       f"{start:.4g} to {_loss(full)} in {len(full.losses)} steps: give it a working learning "
                       "rate (--full-lr) or more steps")
    lower = [r for r in sweep if r.lr < lora.lr and not r.diverged]
    best_lower = min(lower, key=lambda r: r.final, default=None)
    if lora.diverged or lora.final > start:
        what = "diverged" if lora.diverged else f"ended above its start ({lora.final:.4g} > {start:.4g})"
        if best_lower is not None and best_lower.final < start:
            return Verdict("diverges", LR_TOO_HIGH, f"the LoRA run (lr {lora.lr:.3g}) {what}; at lr "
                           f"{best_lower.lr:.3g} it reaches {best_lower.final:.4g}")
        return Verdict("diverges", None, f"the LoRA run (lr {lora.lr:.3g}) {what}, and so did every lower "
                       "learning rate tried")
    share = progress_share(start, full.final, lora.final)
    said = (f"LoRA's loss {lora.final:.4g} vs full fine-tuning's {full.final:.4g} from {start:.4g}: "
            f"{share:.0%} of the reference's progress (in log loss)")
    if share >= 1 - LAG_TOLERANCE:
        return Verdict("converges", None, said + f" (at least {1 - LAG_TOLERANCE:.0%} converges)")
    best = min((r for r in sweep if not r.diverged), key=lambda r: r.final, default=lora)
    best_share = progress_share(start, full.final, best.final)
    closes = best is not lora and best_share - share >= LR_CLOSES * (1 - share)
    if closes:
        return Verdict("lags", LR_TOO_HIGH if best.lr < lora.lr else LR_TOO_LOW,
                       said + f"; at lr {best.lr:.3g}: {best_share:.0%}")
    return Verdict("lags", RANK_TOO_LOW, said + f"; no learning rate tried closes {LR_CLOSES:.0%} of the rest "
                   f"(the best, lr {best.lr:.3g}: {best_share:.0%})")


def progress_share(start: float, full_final: float, lora_final: float) -> float:
    """ln(L0 / final_lora) / ln(L0 / final_full): LoRA's progress as a share of the reference's, in
    log loss (1: as far; 0: nowhere; above 1: further)."""
    return math.log(start / max(lora_final, 1e-12)) / math.log(start / max(full_final, 1e-12))


def _loss(run: Run) -> str:
    return "a divergence" if run.diverged else f"{run.final:.4g}"


def capacity(adapter_parameters: int, supervised_tokens: int, start: float, full_final: float) -> dict:
    """The capacity check: what the adapters can hold against what the data asks of them (bits)."""
    bits_per_token = max(0.0, start - full_final) / math.log(2) if math.isfinite(full_final) else 0.0
    needed = supervised_tokens * bits_per_token
    held = CAPACITY_BITS_PER_PARAMETER * adapter_parameters
    out = {"adapter_parameters": adapter_parameters, "capacity_bits": held, "supervised_tokens": supervised_tokens,
           "bits_per_token": bits_per_token, "information_bits": needed, "ratio": needed / held if held else math.inf,
           "warning": None}
    if needed > held:
        out["warning"] = (f"the data is large for the rank: its {supervised_tokens:,} supervised tokens carry about "
                          f"{needed:,.0f} bits to learn ({bits_per_token:.2f} bits/token, what full fine-tuning "
                          f"learned), the adapters' {adapter_parameters:,} parameters hold about {held:,.0f} "
                          f"({CAPACITY_BITS_PER_PARAMETER:g} bits each); LoRA is likely to fall behind full "
                          "fine-tuning: raise lora.r")
    return out


def variant(config: RunConfig, method: str, lr: float, steps: int) -> RunConfig:
    """The config of one of the probe's runs: `method` at `lr` for `steps` steps, logging every step,
    no checkpoint, no generation (the held-out loss before and after only). Full fine-tuning drops
    what only adapters have (LoRA+, LoftQ's initialisation), which the config refuses with it."""
    adapters_only = ["train.loraplus_ratio=", "lora.init=default"] if method == "full" else []
    return RunConfig.from_dict(config.to_dict(), [
        f"method={method}", f"train.lr={lr!r}", f"train.steps={steps}", "train.epochs=", "train.log_every=1",
        f"train.save_every={steps}", "eval.every=0", "eval.generate=false", *adapters_only])


def same_batches(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> bool:
    """Whether two runs saw the same token ids at every step both ran (a diverged run stops early)."""
    return all(len(x) == len(y) and all(torch.equal(i, j) for i, j in zip(x, y)) for x, y in zip(a, b))


class Probe:
    """The runs of one probe: the base, tokenizer and data shared by all, in one scratch directory."""

    def __init__(self, config: RunConfig, steps: int, workdir: Path, log, base: Callable[[RunConfig], torch.nn.Module],
                 tokenizer, data: tuple):
        self.config, self.steps, self.workdir, self.log = config, steps, workdir, log
        self.base, self.tokenizer, self.data = base, tokenizer, data

    def variant(self, method: str, lr: float) -> RunConfig:
        return variant(self.config, method, lr, self.steps)

    def model(self, config: RunConfig) -> torch.nn.Module:
        base = self.base(config)
        torch.manual_seed(config.train.seed)  # as training.setup.prepare: the same adapters in every LoRA run
        return prepare_model(base, config)

    def run(self, name: str, config: RunConfig, model: torch.nn.Module) -> Run:
        recorder = RecordingObjective(objective_for(config))
        run_dir = self.workdir / name
        lines: list[str] = []
        summary = train(config, run_dir, prepared=Prepared(model, self.tokenizer, *self.data), log=lines.append,
                        progress=False, objective=recorder)
        losses = [r["loss"] for r in monitor.MetricsLog(run_dir / "metrics.jsonl").read() if r["type"] == "train"]
        diverged = any(d["kind"] in monitor.STOPPED for d in summary["diagnostics"])
        after = summary.get("after") or {}
        run = Run(name, config.method, config.train.lr, losses, diverged, after.get("val_loss"), recorder.batches)
        self.log(f"probe: {name:<14} lr {run.lr:<9.3g} loss {losses[0] if losses else math.nan:.4g} -> "
                 f"{_loss(run)} ({len(losses)} steps)")
        return run


def probe(config: RunConfig, steps: int = DEFAULT_STEPS, *, full_lr: float | None = None,
          out: str | Path | None = None, log=print, base: Callable[[RunConfig], torch.nn.Module] | None = None,
          tokenizer=None, data: tuple | None = None) -> dict:
    """Run the probe for `config` (a LoRA or QLoRA SFT run); returns the report (see the module
    docstring), also written to out/probe.json with the curves in out/probe.png when `out` is given.
    Without `base` (the model and data are the config's), the report is also recorded where
    `lorakit train` of the same config finds it (training.output.probe_record_path) and puts its
    verdict and advice in summary.json's diagnostics.

    full_lr: the reference's learning rate (default: train.lr x FULL_LR_FACTOR). base(config) -> a
    fresh, unprepared base model for a run's config, with `tokenizer` and `data` (train, validation,
    test): instead of config.model and config.data (scripts and tests).
    """
    config = _checked(config, steps)
    lr = config.train.lr
    full_lr = lr * FULL_LR_FACTOR if full_lr is None else full_lr
    if not (isinstance(full_lr, (int, float)) and math.isfinite(full_lr) and full_lr > 0):
        raise ValueError(f"full_lr={full_lr!r}: the reference's learning rate must be a number > 0 (e.g. {lr / 10:g})")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; give a directory for probe.json and probe.png")
    recorded = base is None
    if base is None:
        from .models import load_tokenizer, resolve_model_dir

        tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
        data = load_data(config, tokenizer, log)  # resolves data.max_length "auto", which the plan needs
        memory = _memory(variant(config, "full", full_lr, steps), None)  # before any weight is read
        base = cached_base()
    elif tokenizer is None or data is None:
        raise ValueError("probe(base=...) needs the tokenizer and the data (train, validation, test) too")
    else:
        memory = None
    with tempfile.TemporaryDirectory(prefix="lorakit-probe-") as workdir:
        p = Probe(config, steps, Path(workdir), log, base, tokenizer, data)
        full_config = p.variant("full", full_lr)
        reference = p.model(full_config)
        memory = memory or _memory(full_config, reference)
        layers = memory.get("layers")
        if layers is not None:  # the comparison on the layers full fine-tuning can train here
            log(f"probe: full fine-tuning of all {memory['num_layers']} layers does not fit; the reference trains "
                f"layers {layers} only, and LoRA adapts the same layers")
            p.config = on_layers(config, layers, reference)
            train_only_layers(reference, layers)
        targets = resolve_targets(reference, p.config.lora.lora_config())
        before = {name: reference.get_submodule(name).weight.detach().clone() for name in targets}
        full = p.run("full", full_config, reference)
        ranks = update_ranks(before, reference)
        del reference, before

        lora_config = p.variant(p.config.method, lr)
        lora_model = p.model(lora_config)
        adapter_parameters = trainable_parameters(lora_model).trainable
        lora = p.run(config.method, lora_config, lora_model)
        del lora_model
        sweep = _sweep(p, lora)
        at_rank = _rank_sweep(p, sweep, recommended_rank(ranks))
    report = _report(config, steps, full, lora, sweep, ranks, adapter_parameters, memory, data[0], out, layers,
                     at_rank)
    if recorded:  # the model and data are the config's: `lorakit train` of it shows the verdict
        path = probe_record_path(config)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, json.dumps(report, indent=2) + "\n")
    return report


def _checked(config: RunConfig, steps: int) -> RunConfig:
    config = config.validate()
    problems = []
    if config.method == "full":
        problems.append("method=full: the probe compares a LoRA or QLoRA run with full fine-tuning; set "
                        "method=lora or method=qlora")
    if config.objective != "sft":
        problems.append(f"objective={config.objective!r}: the probe compares supervised fine-tuning runs "
                        "(objective sft)")
    if not (isinstance(steps, int) and steps >= 2):
        problems.append(f"steps={steps!r}: the probe needs at least 2 steps per run (default {DEFAULT_STEPS})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("the probe runs in one process; start it without torchrun")
    if problems:
        raise ConfigError("probe", problems)
    return config


def cached_base() -> Callable[[RunConfig], torch.nn.Module]:
    """base(config) for the probe's runs: the model read once per storage (full precision, or NF4
    for QLoRA) and copied for every run."""
    loaded: dict[str | None, torch.nn.Module] = {}

    def base(config: RunConfig) -> torch.nn.Module:
        if config.quantize not in loaded:
            loaded[config.quantize] = load_base(config)[0]
        return copy.deepcopy(loaded[config.quantize])

    return base


def _memory(full_config: RunConfig, model: torch.nn.Module | None) -> dict:
    """The planner's peak for the full fine-tuning reference against the device's memory. When it
    does not fit: the layers the reference trains instead (`layers`, subset_plan); ValueError when
    not even the last one alone fits (the probe cannot run its reference)."""
    from .planner import GiB, arch_for_run, arch_from_config, available_memory, memory_plan_line, plan_run, run_device

    device = run_device(full_config)
    try:
        arch = arch_from_config(model.config.to_dict()) if model is not None else arch_for_run(full_config)
        plan = plan_run(full_config, arch, device)
    except (ValueError, KeyError, AttributeError) as e:  # an architecture the planner does not model
        return {"device": device, "skipped": str(e)}
    available = available_memory(torch.device(device))
    out = {"device": device, "full_peak_gib": plan.peak / GiB, "available_gib": available / GiB,
           "line": memory_plan_line(plan, available, device), "num_layers": arch.num_layers, "layers": None}
    if plan.peak <= available:
        return out
    for k in range(arch.num_layers - 1, 0, -1):
        peak = subset_plan(full_config, arch, device, k)
        if peak <= available:
            return {**out, "layers": list(range(arch.num_layers - k, arch.num_layers)), "subset_peak_gib": peak / GiB}
    last = f" (full fine-tuning of its last layer alone: {subset_plan(full_config, arch, device, 1) / GiB:.2f} GiB)" \
        if arch.num_layers > 1 else ""
    raise ValueError(f"the probe's full fine-tuning reference needs {plan.peak / GiB:.2f} GiB (planner, batch "
                     f"{full_config.train.batch_size} x {full_config.data.max_length} tokens) but {device} has "
                     f"{available / GiB:.1f} GiB available: the probe cannot run, not even on a subset of layers"
                     f"{last}; lower train.batch_size or data.max_length, or set train.gradient_checkpointing=true "
                     "(`lorakit plan --set method=full` shows the breakdown)")


def subset_plan(full_config: RunConfig, arch, device: str, k: int) -> int:
    """The planner's peak (bytes) for full fine-tuning of k of the model's layers: the plan of the
    same model cut to k layers (planner.plan_run), plus the weights of the other layers, frozen
    (the difference of the two plans' base weights). An upper bound: the cut model's plan trains
    its embeddings and head as well, which the probe's subset reference freezes."""
    from .planner import plan_run

    cut = dataclasses.replace(arch, num_layers=k)
    if arch.measured is not None:  # counts from the model itself: its total loses the layers cut off
        cut = dataclasses.replace(cut, measured=dataclasses.replace(
            arch.measured, total=arch.measured.total - (arch.num_layers - k) * arch.measured.layer))
    whole, part = plan_run(full_config, arch, device), plan_run(full_config, cut, device)
    return part.peak + whole.components["base_weights"] - part.components["base_weights"]


def on_layers(config: RunConfig, layers: list[int], model: torch.nn.Module) -> RunConfig:
    """`config` with its adapters on `layers` only: the LoRA side of a subset probe. lora.exclude
    gains the full names of the modules it targets in `model` (the base) outside those layers (a
    list joins the list; a regular expression becomes one alternative of a larger one)."""
    outside = [name for name in resolve_targets(model, config.lora.lora_config())
               if layer_index(name) not in set(layers)]
    exclude = config.lora.exclude
    if isinstance(exclude, str):
        exclude = f"(?:{exclude})|" + "|".join(re.escape(name) for name in outside)
    else:
        exclude = list(exclude or []) + outside
    return RunConfig.from_dict(config.to_dict(), [f"lora.exclude={json.dumps(exclude)}"])


def train_only_layers(model: torch.nn.Module, layers: list[int], patterns=None) -> int:
    """Freeze every parameter outside the decoder blocks `layers` (embeddings, head, final norm and
    the other blocks): the full fine-tuning reference of a subset probe. Returns the count that trains."""
    keep = set(layers)
    for name, param in model.named_parameters():
        param.requires_grad_(layer_index(name, patterns) in keep)
    return sum(param.numel() for param in model.parameters() if param.requires_grad)


def _sweep(p: Probe, lora: Run) -> list[Run]:
    """The LoRA run at lr x SWEEP_FACTORS besides the configured one; every run, the configured one
    included, in increasing lr."""
    runs = [lora]
    for factor in SWEEP_FACTORS:
        config = p.variant(p.config.method, lora.lr * factor)
        runs.append(p.run(f"{p.config.method} x{factor:g}", config, p.model(config)))
    return sorted(runs, key=lambda r: r.lr)


def _rank_sweep(p: Probe, sweep: list[Run], rank: int) -> list[Run]:
    """The recommended rank at the best swept lr x RANK_LR_FACTORS, alpha scaled with it (scaled_alpha);
    none when it is the configured rank or every swept run diverged."""
    held_out = held_out_basis(sweep)
    best = min(sweep, key=lambda r: score(r, held_out))
    if rank == p.config.lora.r or math.isinf(score(best, held_out)):
        return []
    runs = []
    for factor in RANK_LR_FACTORS:
        config = RunConfig.from_dict(p.variant(p.config.method, best.lr * factor).to_dict(),
                                     [f"lora.r={rank}", f"lora.alpha={scaled_alpha(p.config, rank)!r}"])
        runs.append(p.run(f"{p.config.method} r{rank} x{factor:g}", config, p.model(config)))
    return runs


def _report(config: RunConfig, steps: int, full: Run, lora: Run, sweep: list[Run], ranks: dict,
            adapter_parameters: int, memory: dict, train_set, out, layers: list[int] | None = None,
            at_rank: list[Run] = ()) -> dict:
    v = verdict(full, lora, sweep)
    start = lora.losses[0] if lora.losses else math.nan
    held_out = held_out_basis([*sweep, *at_rank])
    effective = recommended_rank(ranks)  # the rank the adapters' effective ranks suggest (at_rank's)
    candidates = [(r, config.lora.r) for r in sweep] + [(r, effective) for r in at_rank]
    best, best_r = min(candidates, key=lambda c: score(c[0], held_out))
    if math.isinf(score(best, held_out)):
        best, best_r = None, None
    best_swept = min(sweep, key=lambda r: score(r, held_out))
    identical = all(same_batches(full.batches, r.batches) for r in [*sweep, *at_rank])
    rule_lr = LORA_LR_RATIO * full.lr
    report = {
        "verdict": v.text, "verdict_kind": v.kind, "cause": v.cause, "reason": v.reason,
        "config_key": probe_key(config),
        "layers": layers,  # None: the whole model; else the layers both sides trained (memory)
        "steps": steps, "method": config.method, "r": config.lora.r, "alpha": config.lora.alpha, "lr": lora.lr,
        "full_lr": full.lr, "start_loss": start,
        "final_loss": {"full": _finite(full.final), config.method: _finite(lora.final)},
        "gap": _finite(lora.final - full.final),
        "progress_share": _finite(progress_share(start, full.final, lora.final)) if v.kind in ("converges", "lags")
        else None, "val_loss": {"full": full.val_loss, config.method: lora.val_loss},
        "batches": {"identical": identical, "steps": len(full.batches), "digest": batches_digest(full.batches)},
        "effective_rank": {"energy": ENERGY, "per_type": ranks, "rank": effective},
        "lr_sweep": [{"lr": r.lr, "final_loss": _finite(r.final), "val_loss": r.val_loss, "diverged": r.diverged}
                     for r in sweep],
        "best_swept_lr": best_swept.lr if not math.isinf(score(best_swept, held_out)) else None,
        "rank_lr_sweep": [{"r": effective, "alpha": scaled_alpha(config, effective),
                           "lr": r.lr, "final_loss": _finite(r.final), "val_loss": r.val_loss,
                           "diverged": r.diverged} for r in at_rank],
        "advice_basis": "held-out loss" if held_out else "smoothed final training loss",
        # the best scored run of all: the swept ones at the configured rank, those at the effective rank
        "recommended_rank": best_r if best else effective,
        "recommended_alpha": scaled_alpha(config, best_r) if best else None,
        "recommended_lr": best.lr if best else None,
        "rule_of_thumb": {"rule": f"LoRA's best learning rate is about {LORA_LR_RATIO:g}x full fine-tuning's",
                          "lr": rule_lr,
                          "confirmed": bool(best) and 1 / 3 <= best.lr / rule_lr <= 3},
        "capacity": capacity(adapter_parameters, train_set.supervised_tokens, start, full.final),
        "memory": memory,
        "curves": {"full": full.to_dict(), **{r.name: r.to_dict() for r in [*sweep, *at_rank]}},
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomically(out / "probe.json", json.dumps(report, indent=2) + "\n")
        plot(full, lora, sweep, out / "probe.png")
    return report


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def render(report: dict) -> str:
    """The probe's report as text (what `lorakit probe` prints)."""
    m = report["method"]
    lines = [f"verdict: {report['verdict']}", f"  {report['reason']}",
             (f"after {report['steps']} steps (identical batches: {report['batches']['identical']}): loss "
              f"{report['start_loss']:.4g} -> full {_num(report['final_loss']['full'])}, {m} (r={report['r']}) "
              f"{_num(report['final_loss'][m])} (smoothed), gap {_num(report['gap'])}")]
    if report["val_loss"]["full"] is not None:
        lines.append(f"held-out loss after: full {_num(report['val_loss']['full'])}, {m} {_num(report['val_loss'][m])}")
    lines.append(f"effective rank of the full fine-tuning update ({report['effective_rank']['energy']:.0%} of "
                 "its energy), per module type: median / max over layers (of at most)")
    for name, e in report["effective_rank"]["per_type"].items():
        lines.append(f"  {name:<12} {e['median']:g} / {e['max']} (of {e['limit']})")
    lines.append(f"effective rank suggests r={report['effective_rank']['rank']} (configured: {report['r']})")
    held_out = report["advice_basis"] == "held-out loss"

    def runs(entries) -> str:
        key = "val_loss" if held_out else "final_loss"
        return ", ".join(f"{s['lr']:.3g}: {'diverged' if s['diverged'] else _num(s[key])}" for s in entries)

    lines.append(f"learning-rate sweep ({m}, r={report['r']}, {report['advice_basis']}): {runs(report['lr_sweep'])}")
    if report["rank_lr_sweep"]:
        at = report["rank_lr_sweep"][0]
        lines.append(f"at r={at['r']}, alpha={at['alpha']:g} ({report['advice_basis']}): "
                     f"{runs(report['rank_lr_sweep'])}")
    if report["recommended_lr"] is not None:
        lines.append(f"recommended: lora.r={report['recommended_rank']}, lora.alpha={report['recommended_alpha']:g}, "
                     f"train.lr={report['recommended_lr']:.3g} (the best {report['advice_basis']} of the runs above)")
    rule = report["rule_of_thumb"]
    lines.append(f"recommended lr: {_num(report['recommended_lr'])} (configured: {report['lr']:.3g}); rule of "
                 f"thumb ({rule['rule']}: {rule['lr']:.3g} for the reference's {report['full_lr']:.3g}) "
                 + ("confirmed" if rule["confirmed"] else "not confirmed"))
    c = report["capacity"]
    lines.append(f"capacity: {c['adapter_parameters']:,} adapter parameters (~{c['capacity_bits']:,.0f} bits) for "
                 f"{c['supervised_tokens']:,} supervised tokens (~{c['information_bits']:,.0f} bits to learn)")
    if c["warning"]:
        lines.append(f"warning: {c['warning']}")
    mem = report["memory"]
    if mem:
        lines.append(mem.get("line", f"memory plan: skipped ({mem.get('skipped')})").replace(
            "memory plan:", "memory plan (full fine-tuning):", 1))
    if report.get("layers"):
        lines.append(f"layers: full fine-tuning of all {mem['num_layers']} layers does not fit, so the reference "
                     f"trained layers {report['layers']} only ({mem['subset_peak_gib']:.2f} GiB planned, at most; "
                     "embeddings, head and the other layers frozen) and LoRA adapted the same layers: the verdict "
                     "and the advice are about them")
    return "\n".join(lines)


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def plot(full: Run, lora: Run, sweep: list[Run], path: str | Path) -> Path | None:
    """probe.png: the training loss of the full fine-tuning reference and of the LoRA run (raw and
    smoothed) against the step, and the learning-rate sweep's runs (thin)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lorakit: matplotlib is not installed; skipping probe.png (pip install matplotlib)", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for run, color, label in ((full, "tab:orange", f"full fine-tuning (lr {full.lr:.3g})"),
                              (lora, "tab:blue", f"{lora.method} (lr {lora.lr:.3g})")):
        steps = range(1, len(run.losses) + 1)
        ax.plot(steps, run.losses, color=color, alpha=0.3)
        ax.plot(steps, monitor.smooth(run.losses), color=color,
                label=label + " (raw, smoothed)" + (", diverged" if run.diverged else ""))
    others = [run for run in sweep if run is not lora and run.losses]
    for i, run in enumerate(others):  # shades of grey, darker with the learning rate
        ax.plot(range(1, len(run.losses) + 1), monitor.smooth(run.losses), lw=0.8, ls="--",
                color=plt.cm.Greys(0.35 + 0.6 * i / max(1, len(others) - 1)),
                label=f"{run.method} lr {run.lr:.3g} (smoothed)" + (", diverged" if run.diverged else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return monitor.save_figure(fig, path)
