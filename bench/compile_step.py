"""torch.compile on CPU for the lorakit LoRA step: start-up (compilation) and step time against eager.

    .venv/bin/python bench/compile_step.py --reps 5             # the last line printed is JSON
    .venv/bin/python bench/compile_step.py --reps 3 --layers 4 --compiled blocks   # one cold start-up
    .venv/bin/python bench/compile_step.py --reps 1 --batch 1 --seq 16 --layers 2   # smoke

The step of bench/lora_step.py (SmolLM2-135M-Instruct float32, common.py's fixed batch 8 x 128,
lorakit LoRA r=16 all-linear with its fused update and dropout positions, the chunked loss, AdamW),
three ways:

    eager              as lorakit train runs it today
    compiled backbone  model.model.compile(): the decoder stack (embedding, blocks, final norm) as
                       one torch.compile region; the chunked loss and the optimizer stay eager
    compiled blocks    each decoder layer compiled (layer.compile()); identical blocks could share
                       one compiled graph, but today each is compiled (see model() in main)

Start-up: each contender's first step (compilation included for the compiled ones, from a cold
cache; eager's first step for comparison), run one after the other, then the time the compilation
costs over eager's first step and the number of steps it takes to pay back at the measured saving
per step. Step time: medians of interleaved repetitions (common.time_alternating) after that. Next
to each wall time, its CPU time (the process's, all threads, and its C++ compiler runs'): load on
the machine stretches wall times far more than CPU seconds, so these still compare there
(compilation is mostly single-threaded). Every contender starts with B = 0, so all first losses
equal the base model's: printed as a check that compilation did not change the computation. No
config key is added here; the numbers decide (issue 20, item 4).
--layers N keeps the first N decoder layers (a smaller model for a smoke run).
Each compiled region is one graph without a break: lorakit's dropout draw enters it as one opaque
operator that returns a keep-mask instead of positions (dropout.py; tests/test_compile.py counts the
breaks). Inductor compiles with one thread (TORCHINDUCTOR_COMPILE_THREADS=1, unless set): no pool
of compile workers outlives the run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C
from lora_step import Trainer, lorakit_model


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children (the C++
    compiler runs Inductor starts)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def compiled(model: torch.nn.Module, how: str) -> torch.nn.Module:
    """`model` with torch.compile applied in place: "eager" (none), "backbone", or "blocks"."""
    if how == "backbone":
        model.model.compile()
    elif how == "blocks":
        for layer in model.model.layers:
            layer.compile()
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=C.BATCH)
    parser.add_argument("--seq", type=int, default=C.SEQ)
    parser.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers")
    parser.add_argument("--compiled", default="blocks,backbone",
                        help="which compiled contenders, in this order: blocks, backbone, or both (comma-separated)")
    args = parser.parse_args(argv)
    compiled_ones = args.compiled.split(",")
    if not compiled_ones or any(how not in ("blocks", "backbone") for how in compiled_ones):
        parser.error(f"--compiled {args.compiled!r}: valid choices are blocks, backbone, or blocks,backbone")
    C.setup(args.threads)

    def model():
        m = lorakit_model()
        # No KV cache in a training step: with one, Dynamo guards on each layer's cache slot and
        # compiles every block again (8 at most, torch's recompile limit; the rest run eager).
        m.config.use_cache = False
        if args.layers:
            m.model.layers = m.model.layers[:args.layers]
            m.config.num_hidden_layers = args.layers
        return m

    ids = C.token_batch(C.base_model().config.vocab_size, args.batch, args.seq)
    # Start-up from a cold cache, as a first run: Inductor's on-disk caches (earlier runs) are off.
    # What a process compiles once (Inductor's imports, the C++ toolchain's first runs, kernels) is
    # paid by the first compiled contender only (at 2 layers under load, the first paid 150-220 s, the
    # second ~40 s, in either order). Compare start-ups from separate runs (--compiled blocks, then
    # --compiled backbone); the step times of one run compare directly.
    torch.compiler.config.force_disable_caches = True
    names = {"eager": "eager", **{how: f"compiled {how}" for how in compiled_ones}}
    steps, first, first_cpu, cpu, losses, failed = [], {}, {}, {}, {}, {}
    for how, name in names.items():
        t = Trainer(name, compiled(model(), how), ids, chunked_loss=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            losses[name] = t.step().item()
        except Exception as e:  # a failure to compile is a result here, not a crash of the benchmark
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{name}: first step failed: {failed[name]}", flush=True)
            continue
        first[name], first_cpu[name] = time.perf_counter() - t0, cpu_seconds() - c0
        print(f"{name}: first step {first[name]:.2f} s ({first_cpu[name]:.2f} CPU s), loss {losses[name]:.6f}",
              flush=True)
        steps.append(t)

    def cpu_timed(t):  # t.step, its CPU seconds (all threads) appended to cpu[t.name]
        def step():
            c0 = cpu_seconds()
            t.step()
            cpu.setdefault(t.name, []).append(cpu_seconds() - c0)
        return step

    timed = [C.Contender(t.name, cpu_timed(t)) for t in steps]
    C.time_alternating(timed, reps=args.reps, warmup=1)
    cpu = {name: statistics.median(times[-args.reps:]) for name, times in cpu.items()}  # the timed reps

    eager = next(c for c in timed if c.name == "eager")
    rows, summary = [], {}
    for c in timed:
        saving = eager.median - c.median
        startup = first[c.name] - first["eager"]
        payback = f"{startup / saving:,.0f} steps" if c is not eager and saving > 0 else "-"
        rows.append([c.name, f"{first[c.name]:.2f} s", f"{first_cpu[c.name]:.2f} s",
                     f"{startup:+.2f} s" if c is not eager else "-", f"{c.median:.2f} s",
                     f"{min(c.times):.2f}-{max(c.times):.2f} s", f"{cpu[c.name]:.2f} s",
                     f"{c.median / eager.median:.2f}", f"{cpu[c.name] / cpu['eager']:.2f}", payback,
                     f"{losses[c.name]:.6f}"])
        if c is not eager:
            key = c.name.replace(" ", "_")
            summary[f"{key}_time_ratio"] = round(c.median / eager.median, 3)
            summary[f"{key}_startup_s"] = round(startup, 2)
            summary[f"{key}_cpu_time_ratio"] = round(cpu[c.name] / cpu["eager"], 3)
            summary[f"{key}_startup_cpu_s"] = round(first_cpu[c.name] - first_cpu["eager"], 2)
    for name, why in failed.items():
        rows.append([name, "failed", "-", "-", "-", "-", "-", "-", "-", "-", why])
    print(f"\nlorakit LoRA step, SmolLM2-135M fp32{f' ({args.layers} layers)' if args.layers else ''}, "
          f"batch {args.batch} x {args.seq}, torch {torch.__version__}, {args.reps} interleaved reps, "
          f"{torch.get_num_threads()} threads")
    print(C.table(["step", "first step", "its CPU", "compile cost", "median step", "spread", "its CPU",
                   "time / eager", "CPU / eager", "pays back after", "first loss"], rows))
    print(json.dumps({**summary, "failed": sorted(failed), "reps": args.reps, "batch": args.batch, "seq": args.seq}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
