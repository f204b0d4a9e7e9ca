"""What the benchmarks share: the model and data, alternating timing, and peak-memory accounting.

Timing. The machine is shared (2 cores, other jobs come and go), so absolute times drift by tens of
percent between minutes. Every contender is therefore timed in the same process, interleaved:
repetition k runs A, B, C, ... (the order rotated each repetition so that no contender always
follows the same one), and we report the median over repetitions and the ratio of medians. A ratio
measured this way is far steadier than any single absolute time.

Peak memory (CPU). PyTorch's CPU allocator, via the profiler, as bench/plan_vs_measured.py does:
with profile_memory=True every allocation and free of the c10 CPU allocator is reported with the
running total of bytes allocated since profiling began (`total_allocated`); its maximum over one
training step is the CPU analogue of torch.cuda.max_memory_allocated (kernels' temporaries
included). The bytes already resident when the step starts (parameters, buffers, optimizer states,
4-bit quantization states, the batch) are added. Peak RSS was rejected: glibc keeps freed pages,
torch.empty pages are not resident until touched, and the interpreter and libraries would dominate
the difference between two configurations of a 135M-parameter model. The memory step is a separate
step from the timed ones (the profiler slows every op).
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The configuration: SmolLM2-135M, fp32, CPU, batch 8 x 128 tokens, r=16 on all linear
# layers (not the output head), dropout 0.05.
BATCH, SEQ, RANK, ALPHA, DROPOUT = 8, 128, 16, 32, 0.05


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)


_BASE: dict[torch.dtype, torch.nn.Module] = {}


def base_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A fresh copy of SmolLM2-135M-Instruct in `dtype` (loaded once per process, then deep-copied),
    with transformers' default attention (SDPA), in train mode."""
    if dtype not in _BASE:
        from lorakit.models import load_model

        _BASE[dtype], _ = load_model(dtype=dtype)
    model = copy.deepcopy(_BASE[dtype])
    model.train()
    return model


def token_batch(vocab: int, batch: int = BATCH, seq: int = SEQ, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids (batch, seq): every contender trains on exactly these."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, seq), generator=g)


@dataclass
class Contender:
    """One thing to time: `step()` runs one unit of work (e.g. a training step)."""

    name: str
    step: Callable[[], object]
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def time_alternating(contenders: list[Contender], reps: int, warmup: int = 1, verbose: bool = True) -> None:
    """Fill each contender's `times`: `warmup` untimed runs each, then `reps` interleaved timed runs,
    the order rotated every repetition."""
    for c in contenders:
        for _ in range(warmup):
            c.step()
    for k in range(reps):
        order = contenders[k % len(contenders):] + contenders[: k % len(contenders)]
        for c in order:
            gc.collect()
            t0 = time.perf_counter()
            c.step()
            c.times.append(time.perf_counter() - t0)
        if verbose:
            print(f"  rep {k + 1}/{reps}: " + ", ".join(f"{c.name} {c.times[-1]:.2f}s" for c in contenders),
                  flush=True)


def resident_bytes(*objs) -> int:
    """Bytes of the distinct storages behind the given tensors (shared storage counted once):
    monitor.resident_tensor_bytes, the count every lorakit run adds to its measured peak."""
    from lorakit.monitor import resident_tensor_bytes

    return resident_tensor_bytes(objs)


def model_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters, buffers and bitsandbytes' 4-bit quantization states (which are neither)."""
    tensors = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        while state is not None:  # bnb QuantState: absmax, code, and state2 for double quantization
            tensors += [t for t in vars(state).values() if torch.is_tensor(t)]
            state = getattr(state, "state2", None)
    return tensors


def optimizer_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]


def allocator_peak(step: Callable[[], object]) -> int:
    """Peak bytes allocated by PyTorch's CPU allocator during `step()`, above what was allocated
    before it (see the module docstring): monitor.profiled_peak, the one reading of the profiler's
    running total (which is the process's, counted since its first profile, so its start value is
    subtracted: without that, a later contender paid for blocks an earlier one left behind)."""
    from torch.profiler import ProfilerActivity, profile

    from lorakit.monitor import profiled_peak

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return profiled_peak(prof)


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pastes into bench/README.md as is)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def matmul_rate(size: int = 2048, reps: int = 5) -> list[float]:
    """The machine's sustained float32 matrix-multiply rate, FLOP/s, once per repetition: torch.mm of
    two seeded size x size matrices (2 size^3 multiply-adds counted as FLOPs), at torch's current
    thread count, after one untimed product. The ceiling a training step's matmuls can reach."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2 * size**3 / (time.perf_counter() - t0))
    return rates


def counted_flops(step: Callable[[], object]) -> int:
    """FLOPs of the matrix products (mm, addmm, bmm, attention, ...) that `step()` runs, counted by
    torch.utils.flop_counter.FlopCounterMode at the dispatcher, so those inside hand-written autograd
    functions (fused.py) count too; elementwise work is not counted. torch's table has no entry for
    the in-place addmm_ / baddbmm_ that fused.py's backward and the chunked loss accumulate with
    (it would miss a frozen layer's input-gradient product), so they are counted as addmm / baddbmm."""
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop, baddbmm_flop

    def as_is(formula):  # torch's formulas already read the shapes from the tensors: no second wrapper
        def counted(*args, **kwargs):
            return formula(*args, **kwargs)
        counted._get_raw = True
        return counted

    in_place = {torch.ops.aten.addmm_: as_is(addmm_flop), torch.ops.aten.baddbmm_: as_is(baddbmm_flop)}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        step()
    return counter.get_total_flops()


_PRODUCTS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm,
             torch.ops.aten.baddbmm, torch.ops.aten.baddbmm_}


def matmul_replay(step: Callable[[], object]) -> Callable[[], None]:
    """The matrix products of one `step()` alone, as a function to time as the step's matmul floor:
    the least time any implementation of the step can take with these products on this BLAS.

    Every mm / addmm / bmm / baddbmm (in-place and out= forms too) that step() dispatches is
    recorded with its operands' shapes, strides and dtypes; replay() runs them again, in order, on
    seeded random tensors of those layouts (one set per distinct call, reused). Attention kernels,
    elementwise work, allocation and Python are left out, and the reused operands are warmer in
    cache than a step's: the floor errs low. time_with_floors times it interleaved with the step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    def spec(v):
        return ("tensor", tuple(v.shape), v.stride(), v.dtype) if isinstance(v, torch.Tensor) else v

    calls = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.overloadpacket in _PRODUCTS:
                calls.append((func, tuple(map(spec, args)), {k: spec(v) for k, v in kwargs.items()}))
            return func(*args, **kwargs)

    with Recorder():
        step()
    g = torch.Generator().manual_seed(0)
    made: dict[tuple, torch.Tensor] = {}

    def operand(v):
        if not (isinstance(v, tuple) and v and v[0] == "tensor"):
            return v
        if v not in made:
            made[v] = torch.empty_strided(v[1], v[2], dtype=v[3]).copy_(torch.randn(v[1], generator=g).to(v[3]))
        return made[v]

    ops = [(func, tuple(map(operand, args)), {k: operand(v) for k, v in kwargs.items()})
           for func, args, kwargs in calls]

    def replay() -> None:
        for func, args, kwargs in ops:
            func(*args, **kwargs)

    return replay


def time_with_floors(contenders: list[Contender], reps: int) -> dict[str, float]:
    """time_alternating (no warm-up) of `contenders` and, interleaved with them, of each one's
    matmul floor (matmul_replay of its step); returns the floors' medians by contender name."""
    replays = [Contender(c.name, matmul_replay(c.step)) for c in contenders]
    time_alternating(contenders + replays, reps, warmup=0)
    return {c.name: c.median for c in replays}
