"""torch.compile on CPU for the lorakit LoRA step: start-up (compilation) and step time against eager.

    .venv/bin/python bench/compile_step.py --reps 5             # the last line printed is JSON
    .venv/bin/python bench/compile_step.py --reps 1 --batch 1 --seq 16 --layers 2   # smoke

The step of bench/lora_step.py (SmolLM2-135M-Instruct float32, common.py's fixed batch 8 x 128,
lorakit LoRA r=16 all-linear with its fused update and dropout positions, the chunked loss, AdamW),
three ways:

    eager              as lorakit train runs it today
    compiled backbone  model.model.compile(): the decoder stack (embedding, blocks, final norm) as
                       one torch.compile region; the chunked loss and the optimizer stay eager
    compiled blocks    each decoder layer compiled (layer.compile()); identical blocks share one
                       compiled graph, so compilation is about one block's

Start-up: each contender's first step (compilation included for the compiled ones; eager's first
step for comparison), run one after the other, then the time the compilation costs over eager's
first step and the number of steps it takes to pay back at the measured saving per step. Step time:
medians of interleaved repetitions (common.time_alternating) after that. Every contender starts
with B = 0, so all first losses equal the base model's: printed as a check that compilation did not
change the computation. No config key is added here; the numbers decide (issue 20, item 4).
--layers N keeps the first N decoder layers (a smaller model for a smoke run).
Dynamo breaks the graph in every adapted layer at lorakit's dropout (dropout.sample reads the number
of dropped positions, a data-dependent size), so each block is several compiled pieces with eager
code between them; torch prints the break once per site.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402
from lora_step import Trainer, lorakit_model  # noqa: E402


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
    args = parser.parse_args(argv)
    C.setup(args.threads)

    def model():
        m = lorakit_model()
        if args.layers:
            m.model.layers = m.model.layers[:args.layers]
            m.config.num_hidden_layers = args.layers
        return m

    ids = C.token_batch(C.base_model().config.vocab_size, args.batch, args.seq)
    names = {"eager": "eager", "backbone": "compiled backbone", "blocks": "compiled blocks"}
    steps, first, losses, failed = [], {}, {}, {}
    for how, name in names.items():
        t = Trainer(name, compiled(model(), how), ids, chunked_loss=True)
        t0 = time.perf_counter()
        try:
            losses[name] = t.step().item()
        except Exception as e:  # a failure to compile is a result here, not a crash of the benchmark
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"{name}: first step failed: {failed[name]}", flush=True)
            continue
        first[name] = time.perf_counter() - t0
        print(f"{name}: first step {first[name]:.2f} s, loss {losses[name]:.6f}", flush=True)
        steps.append(t)
    timed = [C.Contender(t.name, t.step) for t in steps]
    C.time_alternating(timed, reps=args.reps, warmup=1)

    eager = next(c for c in timed if c.name == "eager")
    rows, summary = [], {}
    for c in timed:
        saving = eager.median - c.median
        startup = first[c.name] - first["eager"]
        payback = f"{startup / saving:,.0f} steps" if c is not eager and saving > 0 else "-"
        rows.append([c.name, f"{first[c.name]:.2f} s", f"{startup:+.2f} s" if c is not eager else "-",
                     f"{c.median:.2f} s", f"{min(c.times):.2f}-{max(c.times):.2f} s",
                     f"{c.median / eager.median:.2f}", payback, f"{losses[c.name]:.6f}"])
        if c is not eager:
            key = c.name.replace(" ", "_")
            summary[f"{key}_time_ratio"] = round(c.median / eager.median, 3)
            summary[f"{key}_startup_s"] = round(startup, 2)
    for name, why in failed.items():
        rows.append([name, "failed", "-", "-", "-", "-", "-", why])
    print(f"\nlorakit LoRA step, SmolLM2-135M fp32{f' ({args.layers} layers)' if args.layers else ''}, "
          f"batch {args.batch} x {args.seq}, torch {torch.__version__}, {args.reps} interleaved reps, "
          f"{torch.get_num_threads()} threads")
    print(C.table(["step", "first step", "compile cost", "median step", "spread", "time / eager",
                   "pays back after", "first loss"], rows))
    print(json.dumps({**summary, "failed": sorted(failed), "reps": args.reps, "batch": args.batch, "seq": args.seq}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
