"""Watching a run: the metrics log, loss-curve diagnostics, the loss plot, peak memory.

Diagnostics read the training-loss curve the way the QLoRA/LoRA practice advises:
  * a loss that turns NaN/inf, or climbs far above its best value, is divergence: the learning
    rate is likely too high;
  * a loss that stops falling while still far above where it started is a plateau: the rank may
    be too low (or the learning rate too small);
  * but a loss that is not finite at the first step, before any update, says nothing about the
    learning rate: the base model's weights or the data are broken;
  * and a flat loss with a gradient norm of 0 is a collapse, not slow learning: no update can
    change the model any more.
Forgetting is read off the retention KL (eval.retention: KL(base || tuned) per token on general
text the run does not train on): above a threshold, the model has moved away from its base on
text it was not asked to change.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import replacing, write_atomically

# A loss this many times its best value (after warm-up), and at least DIVERGENCE_MIN_RISE nats
# above it, counts as divergence. The absolute margin keeps the noise of a nearly converged run
# (0.004 -> 0.02 nats/token) from reading as divergence.
DIVERGENCE_FACTOR = 3.0
DIVERGENCE_MIN_RISE = 1.0
# Plateau: over the last third of the run the smoothed loss fell by less than this fraction...
PLATEAU_MIN_DROP = 0.02
# ...while it still stands above this fraction of the first smoothed loss.
PLATEAU_MIN_PROGRESS = 0.5
# Collapse: the gradient norm of at least this many of the last logged steps is exactly 0.
COLLAPSE_STEPS = 3
# Diagnostics that stop training (the run keeps its last good checkpoint, if any).
STOPPED = ("diverged", "broken_start")


@dataclass
class Diagnostic:
    kind: str       # "diverged", "broken_start", "plateau", "collapsed" or "forgetting"
    step: int
    message: str


def check_divergence(step: int, loss: float, best: float | None, lr: float, warmup_done: bool,
                     updated: bool = True) -> Diagnostic | None:
    """Divergence at this step: a non-finite loss, or (after warm-up) a loss above both
    DIVERGENCE_FACTOR x the best loss so far and best + DIVERGENCE_MIN_RISE. A non-finite loss
    before any update (updated=False) is a broken start ("broken_start"), whatever the learning rate."""
    limit = None if best is None else max(DIVERGENCE_FACTOR * best, best + DIVERGENCE_MIN_RISE)
    if math.isfinite(loss) and not (warmup_done and limit is not None and loss > limit):
        return None
    if not updated and not math.isfinite(loss):
        return Diagnostic("broken_start", step, f"the loss is {loss} at step {step}, before any update, so the "
                          "learning rate plays no part: the base model's weights or the data are broken "
                          "(the base evaluation's held-out loss tells which).")
    what = f"loss is {loss}" if not math.isfinite(loss) else f"loss {loss:.4g} rose far above its best ({best:.4g})"
    return Diagnostic("diverged", step, f"training diverged at step {step}: {what}. The learning rate "
                      f"({lr:.3g}) is likely too high: try {lr / 3:.3g} or lower, or a longer warm-up.")


def smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def check_plateau(steps: list[int], losses: list[float], r: int | None, lr: float,
                  min_progress: float = PLATEAU_MIN_PROGRESS) -> Diagnostic | None:
    """Plateau over the whole curve: the last third fell by < PLATEAU_MIN_DROP (relative) while the
    loss is still above min_progress x its start. Needs at least 6 points."""
    if len(losses) < 6:
        return None
    s = smooth(losses)
    third = len(s) // 3
    start, before, end = s[0], s[-third - 1], s[-1]
    if before <= 0 or (before - end) / before >= PLATEAU_MIN_DROP or end <= min_progress * start:
        return None
    rank = f"the rank (r={r}) may be too low for this task" if r else "the model may lack capacity"
    return Diagnostic("plateau", steps[-third - 1],
                      f"the loss plateaued at {end:.4g} (from {start:.4g}) since step {steps[-third - 1]}: "
                      f"{rank}, or the learning rate ({lr:.3g}) too small.")


def check_collapse(steps: list[int], losses: list[float], grad_norms: list[float | None],
                   lr: float) -> Diagnostic | None:
    """Collapse: the last COLLAPSE_STEPS (or more) logged steps all have a gradient norm of exactly
    0 (None: not measured, no verdict). The loss is flat because nothing flows back to the trained
    weights, typically after updates so large that the model's outputs saturated."""
    zero = 0
    for norm in reversed(grad_norms):
        if norm is None or norm != 0:
            break
        zero += 1
    if zero < COLLAPSE_STEPS:
        return None
    since = steps[-zero]
    return Diagnostic("collapsed", since, f"training collapsed: the gradient norm is 0 since step {since} and "
                      f"the loss stays at {losses[-1]:.4g}: no update can change the model any more (its "
                      f"outputs saturated). A higher rank or a longer run cannot help; start again with a "
                      f"smaller learning rate than {lr:.3g} or a longer warm-up.")


def check_forgetting(steps: list[int], kls: list[float], threshold: float, lr: float,
                     r: int | None) -> Diagnostic | None:
    """Forgetting: an evaluation's retention KL (nats per token) above `threshold`; the diagnostic
    names the first step where it was, the largest value and what to change."""
    above = [i for i, kl in enumerate(kls) if kl > threshold]
    if not above:
        return None
    first, peak = above[0], max(kls)
    rank = f", smaller rank (r={r})" if r else ""
    return Diagnostic("forgetting", steps[first], f"the model is forgetting: the retention KL(base || tuned) rose "
                      f"above {threshold:g} nats/token at step {steps[first]} (to {kls[first]:.4g}; largest "
                      f"{peak:.4g}): lower lr ({lr:.3g}), fewer steps{rank}, or mix in general data.")


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step or evaluation, flushed line by line."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is gone too
        return records

    def truncate_after(self, step: int) -> None:
        """Keep only records up to `step` (a resumed run rewrites what came after its checkpoint)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step]
        write_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))


def check_curve(records: list[dict], lr: float, r: int | None,
                plateau_progress: float | None = PLATEAU_MIN_PROGRESS) -> Diagnostic | None:
    """A collapse, else a plateau, read off a run's logged training records ("train" lines of
    metrics.jsonl: step, loss, grad_norm). r: the LoRA rank, None for full fine-tuning.
    plateau_progress: the objective's (objectives.Objective.plateau_progress) min_progress of
    check_plateau; None: its loss curve gets no plateau verdict (a collapse is still one)."""
    steps, losses = [x["step"] for x in records], [x["loss"] for x in records]
    collapse = check_collapse(steps, losses, [x["grad_norm"] for x in records], lr)
    if collapse or plateau_progress is None:
        return collapse
    return check_plateau(steps, losses, r, lr, plateau_progress)


def check_retention(evaluations: list[dict], threshold: float, lr: float, r: int | None) -> Diagnostic | None:
    """check_forgetting over the retention KL of the evaluation records that have one."""
    points = [(x["step"], x["retention_kl"]) for x in evaluations if "retention_kl" in x]
    return check_forgetting([s for s, _ in points], [kl for _, kl in points], threshold, lr, r)


def nonfinite_parameters(model) -> list[str]:
    """Names of floating-point parameters holding NaN or inf (this rank's shards under FSDP)."""
    import torch

    out = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                out.append(name)
    return out


def plot_losses(records: list[dict], path: str | Path) -> Path | None:
    """loss.png: training loss (raw and smoothed) and held-out loss against the step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lorakit: matplotlib is not installed; skipping loss.png (pip install matplotlib)", file=sys.stderr)
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("type") == "train" and math.isfinite(r["loss"])]
    evals = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval" and r.get("val_loss") is not None]
    retention = [(r["step"], r["retention_kl"]) for r in records if r.get("type") == "eval" and "retention_kl" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, label="train loss")
        ax.plot(steps, smooth(list(losses)), color="tab:blue", label="train loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if retention:  # on its own linear axis: it starts at exactly 0
        right = ax.twinx()
        steps, kls = zip(*retention)
        right.plot(steps, kls, "s--", color="tab:green", label="retention KL(base || tuned)")
        right.set_ylabel("retention KL (nats/token)")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """A matplotlib figure written as a PNG at `path`, atomically, and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def peak_memory_bytes(device) -> int:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else peak RSS
    (summary.json's `peak_memory_bytes`, kept as it was; peak_rss_bytes and
    peak_memory_allocated_bytes say which is which)."""
    import torch

    if getattr(device, "type", device) == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """The most resident memory this process has held (ru_maxrss: KiB on Linux): the interpreter,
    libraries and pages the C allocator keeps after a free included, so more than the planner counts."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# The profiler's own chatter on stderr, which the training log should not show: kineto prints a
# line when it starts and stops; c10's CPU allocator warns once per process when a block allocated
# before profiling is freed during it (harmless here: such a block was counted as resident).
PROFILER_NOISE = ("profiler_start", "profiler_stop", "allocated before the profiling started")


@contextlib.contextmanager
def _stderr_without(noise: tuple[str, ...]):
    """File descriptor 2 into a temporary file while the block runs; lines that contain none of
    `noise` are written back to stderr afterwards. Without a descriptor 2 (a daemon), nothing to hide."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(n in line for n in noise):
                    sys.stderr.write(line)


def resident_tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a storage shared by several counted once;
    None and meta tensors skipped; an FSDP DTensor counts its local shard)."""
    seen = {}
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def step_tensors(model, optimizer, batches: list[dict]) -> list:
    """What is allocated when a training step starts: the model's parameters (and gradients, None
    after zero_grad(set_to_none=True)), buffers (NF4 weights and their constants included), the
    optimizer's states and the step's batches."""
    import torch

    params = list(model.parameters())
    return [*params, *(p.grad for p in params), *model.buffers(),
            *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
            *(v for b in batches for v in b.values() if torch.is_tensor(v))]


class StepPeak:
    """The allocator's peak during training steps: the quantity the memory planner predicts
    (planner.memory: live tensors, kernels' temporaries included, runtime overhead excluded).

    CUDA: torch.cuda.max_memory_allocated, its peak reset when a step begins and read when it ends;
    the maximum over every step of the run (cheap: the allocator keeps the counter anyway).

    CPU: PyTorch keeps no such counter, so a step is run under the profiler's memory reporting
    (AllocationRecorder: the events of the profile_memory=True profile of bench/common.py and
    bench/plan_vs_measured.py, which the planner was validated against): every allocation and free
    of c10's CPU allocator is reported, and the peak of the bytes held by blocks allocated during the
    step (peak_of_new_blocks), plus the bytes resident when the step began (step_tensors), is the
    step's peak. Recording costs time (about 0.2 s a measured SmolLM2-135M step), so not every step
    is measured: only a step whose largest micro-batch (elements of its largest tensor, e.g. batch x
    padded length) is larger than that of every step measured before (in random order about
    ln(steps) steps; one when every batch has the same shape), and only once the optimizer's states
    exist (not the first step of a fresh run: they are allocated during it, and every later step
    holds them). The planner plans the longest batch, so the largest step is the one to compare with
    it.
    """

    def __init__(self, device, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self.cuda = getattr(device, "type", device) == "cuda"
        self.bytes: int | None = None       # the largest step's peak so far
        self.step: int | None = None        # which step that was
        self.size = 0                       # CPU: elements of the largest tensor of the measured step's batches
        self._size = 0                      # ... of the step being measured
        self.process_cuda_peak = 0          # CUDA: max_memory_allocated before the first reset (earlier work)
        self._profiler = None
        self._resident = 0
        self._step = 0
        self._steps_begun = 0

    def begin(self, step: int, batches: list[dict], model, optimizer) -> None:
        """A training step starts; `batches`: its micro-batches, already built."""
        if not self.enabled:
            return
        self._step, self._steps_begun = step, self._steps_begun + 1
        import torch

        if self.cuda:
            self.process_cuda_peak = max(self.process_cuda_peak, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        size = max((v.numel() for b in batches for v in b.values() if torch.is_tensor(v)), default=0)
        warm = bool(optimizer.state) or self._steps_begun > 1
        if not warm or size <= self.size:
            return
        self._stop_stale()
        self._resident = resident_tensor_bytes(step_tensors(model, optimizer, batches))
        self._size = size
        spent = torch.empty(1)  # allocated before profiling, freed during it: spends c10's one warning
        with _stderr_without(PROFILER_NOISE):
            self._profiler = AllocationRecorder()
            self._profiler.start()
            _ACTIVE.append(self._profiler)
            del spent

    def end(self) -> None:
        """The step has ended (after the optimizer step and zero_grad); calling it again does nothing."""
        if not self.enabled:
            return
        if self.cuda:
            import torch

            measured = torch.cuda.max_memory_allocated(self.device)
            self.process_cuda_peak = max(self.process_cuda_peak, measured)
            if self.bytes is None or measured > self.bytes:
                self.bytes, self.step = measured, self._step
            return
        if self._profiler is None:
            return
        with _stderr_without(PROFILER_NOISE):
            events = self._profiler.stop()
        _ACTIVE.remove(self._profiler)
        self.bytes = self._resident + peak_of_new_blocks(events)
        self.step, self.size, self._profiler = self._step, self._size, None

    @staticmethod
    def _stop_stale() -> None:
        """A measurement left running by a run that raised mid-step: stopped, or no profiler could start."""
        while _ACTIVE:
            with _stderr_without(PROFILER_NOISE):
                _ACTIVE.pop().stop()

    def basis(self) -> str:
        """How peak_memory_allocated_bytes was measured, in words."""
        if self.cuda:
            return "torch.cuda.max_memory_allocated, the largest over every training step (rank 0)"
        if self.bytes is None:
            return ("not measured: the CPU measurement starts once the optimizer's states exist, after the first "
                    "step of a fresh run")
        return (f"CPU allocator peak of step {self.step} (profiler, as bench/common.py), the step with the largest "
                f"batch ({self.size} elements in its largest tensor) once the optimizer's states exist, plus "
                "the parameters, buffers, optimizer states and batch resident when it began")


# Recorders StepPeak has started and not yet stopped (one at most).
_ACTIVE: list = []


class AllocationRecorder:
    """The CPU allocator's allocations and frees while it runs: allocator_totals' events, as a
    profile_memory=True profile reports them, without the profiler's record of every operator.

    torch.profiler.profile records each operator too (an event per aten call, tens of thousands a
    step), and stopping it builds and walks them all: on SmolLM2-135M 0.36-0.45 s a measured step
    (bench/README.md, session 10). Here the same Kineto profiler is enabled with memory reporting and
    only the user scope (record_function blocks), so operators are not recorded and the allocation
    events are the same (tests/test_peak_memory.py: StepPeak equals bench/common.py's public-profiler
    method on the same step, byte for byte). These are torch's private entry points (the ones
    torch.profiler calls); where they differ (another torch), the public profiler is used instead."""

    def __init__(self):
        self._profile = None  # the public profiler, when the private entry points are not there

    def start(self) -> None:
        from torch.profiler import ProfilerActivity

        try:
            from torch._C._profiler import ProfilerConfig, ProfilerState, RecordScope, _ExperimentalConfig
            from torch.autograd.profiler import _enable_profiler, _prepare_profiler

            config = ProfilerConfig(ProfilerState.KINETO, False, True, False, False, False, _ExperimentalConfig())
            _prepare_profiler(config, {ProfilerActivity.CPU})
            _enable_profiler(config, {ProfilerActivity.CPU}, {RecordScope.USER_SCOPE})
        except (ImportError, AttributeError, TypeError):
            from torch.profiler import profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.start()

    def stop(self) -> list[tuple[int, int, int, int]]:
        """Stop recording; the allocations and frees in time order (allocator_events)."""
        if self._profile is not None:
            self._profile.stop()
            return allocator_events(self._profile.profiler.kineto_results)
        from torch.autograd.profiler import _disable_profiler

        return allocator_events(_disable_profiler())


def profiled_peak(prof) -> int:
    """The peak of the CPU allocator's running total during a profile_memory=True profile, above
    its value when profiling began. The total is the process's, counted since the first profile:
    a block allocated while an earlier profile ran and freed after it still counts, so the start
    value (the first event's total minus its own size) is subtracted."""
    events = allocator_totals(prof)
    if not events:
        return 0
    start = events[0][1]
    return max(0, max(total for _, _, total in events) - start)


def allocator_totals(prof) -> list[tuple[int, int, int]]:
    """The CPU allocator's running total at each allocation and free of a profile_memory=True
    profile, in time order: (time in ns, total before the event, total after it)."""
    return [(ns, total - size, total) for ns, size, _, total in allocator_events(prof.profiler.kineto_results)]


def allocator_events(results) -> list[tuple[int, int, int, int]]:
    """Every allocation and free the profiler's results (torch._C._autograd._ProfilerResult) hold,
    in time order: (time in ns, size in bytes (negative: a free), address, running total after it)."""
    events, stack = [], list(results.experimental_event_tree())
    while stack:
        event = stack.pop()
        fields = event.extra_fields
        total = getattr(fields, "total_allocated", None)
        if total is not None:
            events.append((event.start_time_ns, fields.alloc_size, fields.ptr, total))
        stack.extend(event.children)
    return sorted(events, key=lambda e: (e[0], e[3] - e[1]))  # at equal times, by the total before


def peak_of_new_blocks(events: list[tuple[int, int, int, int]]) -> int:
    """The peak bytes held by blocks allocated during the recording (allocator_events), each counted
    from its allocation to its free. A free of a block allocated before is left out: the running
    total counts it (as a block an earlier profile allocated, which a reference cycle kept until the
    collector ran inside the step), so profiled_peak would come out that much too low."""
    live, held, peak = set(), 0, 0
    for _, size, address, _ in events:
        if size > 0:
            live.add(address)
            held += size
            peak = max(peak, held)
        elif address in live:
            live.remove(address)
            held += size
    return peak


def memory_summary(device, planned: int | None, peak: StepPeak | None) -> dict:
    """summary.json's memory keys:
    peak_memory_bytes            as before: the CUDA allocator's process peak on a GPU, else peak RSS
    peak_rss_bytes               the process's peak resident memory (interpreter and libraries included)
    peak_memory_allocated_bytes  the allocator's peak during training steps: the planner's basis (StepPeak)
    peak_memory_allocated_basis  how it was measured (which step, on CPU)
    peak_memory_allocated_step   the step it was measured at (None: not measured)
    planned_peak_bytes           the planner's predicted allocator peak, the same basis (None when skipped)"""
    legacy = peak_memory_bytes(device)
    if peak is not None and peak.cuda:
        legacy = max(legacy, peak.process_cuda_peak)  # the per-step resets hid what came before
    return {"peak_memory_bytes": legacy,
            "peak_rss_bytes": peak_rss_bytes(),
            "peak_memory_allocated_bytes": peak.bytes if peak else None,
            "peak_memory_allocated_basis": peak.basis() if peak else "not measured",
            "peak_memory_allocated_step": peak.step if peak else None,
            "planned_peak_bytes": planned}


def memory_line(summary: dict) -> str:
    """The line `lorakit train` ends with: "memory: planned X, measured Y (Z%)", Z = measured / planned,
    then the step measured and the peak RSS (a different quantity: the whole process)."""
    planned, measured = summary["planned_peak_bytes"], summary["peak_memory_allocated_bytes"]
    step = summary["peak_memory_allocated_step"]
    head = (f"memory: planned {_size(planned) if planned is not None else 'nothing (no plan)'}, "
            f"measured {_size(measured) if measured is not None else 'nothing'}")
    if planned and measured is not None:
        head += f" ({100 * measured / planned:.0f}%)"
    where = f"allocator peak of step {step}" if step is not None else "no step measured"
    return f"{head}: {where}; peak RSS {_size(summary['peak_rss_bytes'])} (the whole process)"


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
