"""The distance to the hardware: a training step's matmul FLOPs per second against the machine's
sustained float32 matmul rate, for full fine-tuning and for a lorakit LoRA step.

    .venv/bin/python bench/flops.py --reps 5                    # the last line printed is JSON
    .venv/bin/python bench/flops.py --reps 1 --batch 1 --seq 16 --size 256   # smoke

1. The machine: torch.mm of two --size x --size float32 matrices at --threads threads
   (common.matmul_rate), the median over repetitions, in GFLOP/s.
2. The step (bench/lora_step.py's, on common.py's fixed batch, default 8 x 128): full fine-tuning
   (`model(...).loss`, every weight trained) and lorakit LoRA (r=16 all-linear, fused update, chunked
   loss), each forward, loss, backward, AdamW step. Its FLOPs are COUNTED on one step by
   torch.utils.flop_counter.FlopCounterMode (common.counted_flops: every mm/addmm/bmm and the
   attention products, including those inside lorakit's own autograd functions), not assumed.
   The step times are medians of interleaved repetitions (common.time_alternating).
3. Printed: counted FLOPs, the analytic model FLOPs for comparison (N = the parameters that take
   part in matrix products, the tied head included; T = tokens; full: 6 N T; LoRA: 4 N T, forward
   and input gradients of the frozen weights, + 6 N_adapter T; neither counts attention's T^2 terms),
   the achieved rate = counted FLOPs / median step time, as a fraction of the matmul rate, and the
   LoRA / full step-time ratio (issue 20's targets: >= 60% of the matmul rate; <= 0.70x).
4. The matmul floor of each step (common.matmul_replay): its own matrix products, recorded with
   their shapes and layouts and replayed with nothing else, timed interleaved with the steps (the
   same medians). A step can be no faster than
   that on this BLAS; time / floor is what everything else (attention, elementwise work, Python)
   adds, and the floors' LoRA / full ratio is the least step-time ratio these products allow.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402
from lora_step import Trainer, lorakit_model  # noqa: E402


def matmul_parameters(full: torch.nn.Module, lora: torch.nn.Module) -> tuple[int, int]:
    """(N, N_adapter): the weights of the full model's nn.Linear products (the head included, even
    when tied to the embedding, which is a lookup), and the LoRA model's trainable parameters (the
    adapters' A and B)."""
    n = sum(m.weight.numel() for m in full.modules() if isinstance(m, torch.nn.Linear))
    return n, sum(p.numel() for p in lora.parameters() if p.requires_grad)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=4096, help="side of the square matrices of the matmul rate")
    parser.add_argument("--batch", type=int, default=C.BATCH)
    parser.add_argument("--seq", type=int, default=C.SEQ)
    args = parser.parse_args(argv)
    C.setup(args.threads)

    rates = C.matmul_rate(args.size, reps=max(3, args.reps))
    peak = statistics.median(rates)
    print(f"matmul rate: torch.mm {args.size} x {args.size} float32, {torch.get_num_threads()} threads: "
          f"{peak / 1e9:.1f} GFLOP/s (median of {len(rates)}, {min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f})",
          flush=True)

    base = C.base_model()
    ids = C.token_batch(base.config.vocab_size, args.batch, args.seq)
    del base
    steps = [Trainer("full fine-tuning", C.base_model(), ids, chunked_loss=False),
             Trainer("lorakit LoRA", lorakit_model(), ids, chunked_loss=True)]
    flops = {t.name: C.counted_flops(t.step) for t in steps}  # also the warm-up (optimizer states exist)
    timed = [C.Contender(t.name, t.step) for t in steps]
    floors = C.time_with_floors(timed, args.reps)

    tokens = ids.numel()
    n, lora_adapter = matmul_parameters(steps[0].model, steps[1].model)
    analytic = {"full fine-tuning": 6 * n * tokens, "lorakit LoRA": 4 * n * tokens + 6 * lora_adapter * tokens}
    rows, achieved = [], {}
    for c in timed:
        achieved[c.name] = flops[c.name] / c.median / peak
        rows.append([c.name, f"{flops[c.name] / 1e9:,.1f}", f"{analytic[c.name] / 1e9:,.1f}",
                     f"{flops[c.name] / analytic[c.name]:.2f}", f"{c.median:.2f} s",
                     f"{min(c.times):.2f}-{max(c.times):.2f} s", f"{flops[c.name] / c.median / 1e9:.1f}",
                     f"{achieved[c.name]:.0%}", f"{floors[c.name]:.2f} s", f"{c.median / floors[c.name]:.2f}"])
    print(f"\nSmolLM2-135M fp32, batch {args.batch} x {args.seq} ({tokens} tokens), N = {n / 1e6:.1f}M in "
          f"matmuls, adapters {lora_adapter / 1e6:.2f}M, {args.reps} interleaved reps; matmul rate {peak / 1e9:.1f} "
          "GFLOP/s")
    print(C.table(["step", "counted GFLOP", "analytic GFLOP", "counted / analytic", "median time", "spread",
                   "GFLOP/s", "of matmul rate", "matmul floor", "time / floor"], rows))
    ratio = timed[1].median / timed[0].median
    per_rep = [lo / fu for lo, fu in zip(timed[1].times, timed[0].times)]
    print(f"lorakit LoRA / full fine-tuning step time: {ratio:.2f} (per repetition "
          + ", ".join(f"{r:.2f}" for r in per_rep) + f"); counted FLOPs ratio "
          f"{flops['lorakit LoRA'] / flops['full fine-tuning']:.2f}; matmul floors ratio "
          f"{floors['lorakit LoRA'] / floors['full fine-tuning']:.2f}")
    print(json.dumps({"matmul_gflops": round(peak / 1e9, 2),
                      "full_fraction_of_matmul_rate": round(achieved["full fine-tuning"], 3),
                      "lora_fraction_of_matmul_rate": round(achieved["lorakit LoRA"], 3),
                      "lora_over_full_time_ratio": round(ratio, 3),
                      "lora_over_full_flops_ratio": round(flops["lorakit LoRA"] / flops["full fine-tuning"], 3),
                      "full_time_over_matmul_floor": round(timed[0].median / floors["full fine-tuning"], 3),
                      "lora_time_over_matmul_floor": round(timed[1].median / floors["lorakit LoRA"], 3),
                      "lora_over_full_floor_ratio": round(floors["lorakit LoRA"] / floors["full fine-tuning"], 3),
                      "reps": args.reps, "batch": args.batch, "seq": args.seq}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
