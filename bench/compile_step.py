"""torch.compile on CPU for the lorakit LoRA step: start-up (compilation) and step time against eager.

    .venv/bin/python bench/compile_step.py --reps 5             # the last line printed is JSON
    .venv/bin/python bench/compile_step.py --reps 3 --layers 4 --compiled blocks   # one cold start-up
    .venv/bin/python bench/compile_step.py --reps 1 --batch 1 --seq 16 --layers 2   # smoke
    .venv/bin/python bench/compile_step.py --memory --compiled blocks   # allocator peaks, no timing
    .venv/bin/python bench/compile_step.py --recompiles --layers 2   # graphs of lorakit train, padded vs packed

The step of bench/lora_step.py (SmolLM2-135M-Instruct float32, common.py's fixed batch 8 x 128,
lorakit LoRA r=16 all-linear with its fused update and dropout positions, the chunked loss, AdamW),
three ways:

    eager              as lorakit train runs it today
    compiled backbone  model.model.compile(): the decoder stack (embedding, blocks, final norm) as
                       one torch.compile region; the chunked loss and the optimizer stay eager
    compiled blocks    each decoder layer compiled in place, as train.compile does (training.setup.
                       compile_blocks: layer.compile()); the 30 blocks share two graphs (the first
                       block's input needs no gradient, the others' does)

Start-up: each contender's first step (compilation included for the compiled ones, from a cold
cache; eager's first step for comparison), run one after the other, then the time the compilation
costs over eager's first step and the number of steps it takes to pay back at the measured saving
per step. Step time: medians of interleaved repetitions (common.time_alternating) after that. Next
to each wall time, its CPU time (the process's, all threads, and its C++ compiler runs'): load on
the machine stretches wall times far more than CPU seconds, so these still compare there
(compilation is mostly single-threaded). Every contender starts with B = 0, so all first losses
equal the base model's: printed as a check that compilation did not change the computation.
"compiled blocks" is what `train.compile: true` does (training.setup.compile_blocks); the numbers
decide whether it becomes a default (issue 20, item 4).
--memory: no timing; after each contender's first step, the memory of one more step as lora_step.py
measures it (Trainer.peak_memory: resident model, optimizer and batch, plus the CPU allocator's
peak during the step, common.allocator_peak), which does not depend on the machine's load.
--recompiles: no timing; `lorakit train` with train.compile on variable-length data (sft_vs_trl.py's
generated records: median ~100 tokens, a tail to ~1,000; --train-steps steps of 4 examples), padded
batches against packed rows: the graphs Dynamo compiles and why it compiled again (its guard
failures). The blocks share their graphs, so the count is the same for any --layers from 2 up (with
one layer, no block's input needs a gradient: half the graphs).
--layers N keeps the first N decoder layers (a smaller model for a smoke run).
Each compiled region is one graph without a break: lorakit's dropout draw enters it as one opaque
operator that returns a keep-mask instead of positions (dropout.py; tests/test_compile.py counts the
breaks). Inductor compiles with one thread (TORCHINDUCTOR_COMPILE_THREADS=1, unless set): no pool
of compile workers outlives the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C
from lora_step import Trainer, lorakit_model

from lorakit.training.setup import compile_blocks


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
        compile_blocks(model)  # what train.compile does: each decoder layer's nn.Module.compile()
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
    parser.add_argument("--memory", action="store_true",
                        help="measure each contender's memory after its first step instead of timing it")
    parser.add_argument("--recompiles", action="store_true",
                        help="count the graphs lorakit train compiles on variable-length data, padded vs packed")
    parser.add_argument("--train-steps", type=int, default=10, help="--recompiles: optimizer steps of each run")
    args = parser.parse_args(argv)
    compiled_ones = args.compiled.split(",")
    if not compiled_ones or any(how not in ("blocks", "backbone") for how in compiled_ones):
        parser.error(f"--compiled {args.compiled!r}: valid choices are blocks, backbone, or blocks,backbone")
    C.setup(args.threads)
    if args.recompiles:
        return recompiles(args)

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
    if args.memory:
        return memory(names, model, ids, args)
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


def memory(names: dict[str, str], model, ids: torch.Tensor, args) -> int:
    """--memory: each contender's first step (compilation), then the memory of its next step
    (Trainer.peak_memory), as a table and a JSON line of ratios to eager."""
    rows, peaks, resident, losses = [], {}, {}, {}
    for how, name in names.items():
        t = Trainer(name, compiled(model(), how), ids, chunked_loss=True)
        losses[name] = t.step().item()
        resident[name] = C.resident_bytes(*C.model_tensors(t.model), *C.optimizer_tensors(t.opt), t.ids)
        peaks[name] = t.peak_memory() - resident[name]
        print(f"{name}: step peak {C.mib(peaks[name])} above {C.mib(resident[name])} resident", flush=True)
        del t
    for name in names.values():
        rows.append([name, C.mib(resident[name]), C.mib(peaks[name]), C.mib(resident[name] + peaks[name]),
                     f"{peaks[name] / peaks['eager']:.2f}",
                     f"{(resident[name] + peaks[name]) / (resident['eager'] + peaks['eager']):.2f}",
                     f"{losses[name]:.6f}"])
    print(f"\nlorakit LoRA step memory, SmolLM2-135M fp32{f' ({args.layers} layers)' if args.layers else ''}, "
          f"batch {args.batch} x {args.seq}, torch {torch.__version__} (CPU allocator, after the first step)")
    print(C.table(["step", "resident", "step peak", "total", "step peak / eager", "total / eager", "first loss"],
                  rows))
    print(json.dumps({**{f"{name.replace(' ', '_')}_peak_ratio": round(peaks[name] / peaks["eager"], 3)
                         for name in names.values() if name != "eager"},
                      **{f"{name.replace(' ', '_')}_total_ratio": round(
                          (resident[name] + peaks[name]) / (resident["eager"] + peaks["eager"]), 3)
                         for name in names.values() if name != "eager"},
                      "batch": args.batch, "seq": args.seq}))
    return 0


def recompiles(args) -> int:
    """--recompiles: `lorakit train` (training.train, train.compile: true, lora r=16 all-linear,
    dropout) on sft_vs_trl.py's records, padded batches of 4 examples and packed rows of
    max_length 1,024, --train-steps steps each; the graphs Dynamo compiled and its guard failures
    (the reasons it compiled again)."""
    import tempfile

    from sft_vs_trl import make_records, packed_batches, write_jsonl

    from lorakit.config import RunConfig
    from lorakit.models import load_model
    from lorakit.training import Prepared, train
    from lorakit.training.setup import load_data, prepare_model

    work = Path(tempfile.mkdtemp(prefix="compile_recompiles-"))
    base, tokenizer = load_model(dtype=torch.float32)
    write_jsonl(work / "train.jsonl", make_records(args.train_steps * 4, 0, 1024, tokenizer))
    rows, summary = [], {}
    for mode in ("padded", "packed"):
        config = RunConfig.from_dict({}, [
            f"data.train={work / 'train.jsonl'}", "data.validation_fraction=0", "data.max_length=1024",
            f"data.packing={str(mode == 'packed').lower()}", f"train.steps={args.train_steps}", "train.batch_size=4",
            "train.schedule=constant", "train.warmup_steps=0", "train.save_every=1000000", "train.device=cpu",
            "train.compile=true", f"lora.r={C.RANK}", f"lora.alpha={C.ALPHA}", f"lora.dropout={C.DROPOUT}",
            "eval.every=0", "eval.generate=false"])
        train_set, validation, test = load_data(config, tokenizer, log=lambda _: None)
        if mode == "packed":
            config.train.batch_size, config.train.steps = packed_batches(len(train_set.examples), args.train_steps)
        model = copy.deepcopy(base)
        if args.layers:
            model.model.layers = model.model.layers[:args.layers]
            model.config.num_hidden_layers = args.layers
        prepare_model(model, config)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch._dynamo.utils.guard_failures.clear()
        train(config, work / mode, prepared=Prepared(model, tokenizer, train_set, validation, test),
              log=lambda _: None, progress=False)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compilations = torch._dynamo.utils.counters["frames"]["ok"]  # the first and every recompilation
        # a recompilation lists each earlier graph's failed guard: the distinct reasons
        reasons = sorted({line.split(": ", 1)[-1][:80] for failures in torch._dynamo.utils.guard_failures.values()
                          for failure in failures for line in failure.splitlines()})
        lengths = sorted({len(e.input_ids) for e in train_set.examples})
        rows.append([mode, f"{config.train.steps} x {config.train.batch_size}", f"{lengths[0]}-{lengths[-1]}",
                     str(compilations), str(graphs), "; ".join(reasons)])
        summary[f"{mode}_compilations"], summary[f"{mode}_graphs"] = compilations, graphs
        print(f"{mode}: {compilations} compilations, {graphs} graphs", flush=True)
    print(f"\nlorakit train, train.compile: true, SmolLM2-135M fp32"
          f"{f' ({args.layers} layers)' if args.layers else ''}, torch {torch.__version__}")
    print(C.table(["batches", "steps x rows", "row lengths", "compilations", "graphs", "why again (failed guards)"],
                  rows))
    print(json.dumps({**summary, "train_steps": args.train_steps, "layers": args.layers}))
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
