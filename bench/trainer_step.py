"""A training step run by transformers' Trainer: peft's adapters vs lorakit's, with and without ChunkedLoss.

    .venv/bin/python bench/trainer_step.py --reps 7     # the last line printed is the results as JSON

The step of round 1 (bench/lora_step.py; SmolLM2-135M-Instruct float32 from lorakit.models.load_model,
seeded random tokens 8 x 128, r=16 alpha=32 dropout 0.05 on all linear layers but the head, AdamW),
run as Trainer runs it: `Trainer.training_step` (its compute_loss: the model's own forward and
transformers' loss, or `compute_loss_func=ChunkedLoss(model)`; backward through accelerate), the
gradient clipping at `max_grad_norm`, the optimizer Trainer creates (`args.optim`) stepping, and
zero_grad. Contenders:

    Trainer + peft                       get_peft_model(model, LoraConfig(...))
    Trainer + lorakit adapters           add_lora(model, LoraConfig(...))
    Trainer + lorakit adapters + chunked the same, compute_loss_func=ChunkedLoss(model)

and with --bound, "Trainer + lorakit adapters + chunked loss, no dropout": the last at dropout 0. The
step with dropout does every operation of it, so its time is a lower bound for that step, whatever
lorakit's dropout costs; its ratio is against the same Trainer + peft.

Timed interleaved in one process, medians and ratios of medians against Trainer + peft, and with
them each step's matmul floor (common.matmul_replay: its matrix products alone), whose ratio to
Trainer + peft's step is the least time ratio those products allow on this BLAS; peak memory
from the allocator on one more step (bench/common.py). Every contender starts from the same weights
with B = 0, so their first losses equal the base model's (printed as a check).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402
from lora_step import lorakit_model, peft_model  # noqa: E402

REFERENCE = "Trainer + peft"
BOUND = "Trainer + lorakit adapters + chunked loss, no dropout"


class TrainerStep:
    """One contender: a Trainer around its model, stepping on the fixed batch."""

    def __init__(self, name: str, model, ids: torch.Tensor, out_dir: str, chunked_loss: bool = False,
                 optim: str = "adamw_torch"):
        from transformers import Trainer, TrainingArguments

        from lorakit import ChunkedLoss

        args = TrainingArguments(output_dir=out_dir, learning_rate=1e-4, optim=optim, report_to=[],
                                 use_cpu=True, disable_tqdm=True, save_strategy="no")
        self.name, self.model, self.ids = name, model, ids
        self.trainer = Trainer(model=model, args=args,
                               compute_loss_func=ChunkedLoss(model) if chunked_loss else None)
        self.trainer.create_optimizer()
        self.inputs = {"input_ids": ids, "labels": ids}
        # What Trainer's loop passes: the number of target tokens (each row's first has none)
        self.num_items = torch.tensor(ids[:, 1:].numel())

    def step(self) -> torch.Tensor:
        trainer, params = self.trainer, [p for p in self.model.parameters() if p.requires_grad]
        loss = trainer.training_step(self.model, self.inputs, self.num_items)
        trainer.accelerator.clip_grad_norm_(params, trainer.args.max_grad_norm)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    def peak_memory(self) -> int:
        """Resident model, optimizer state and batch, plus the allocator's peak during one step."""
        resident = C.resident_bytes(*C.model_tensors(self.model), *C.optimizer_tensors(self.trainer.optimizer),
                                    self.ids)
        return resident + C.allocator_peak(self.step)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optim", default="adamw_torch", help="TrainingArguments.optim for every contender")
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory step")
    parser.add_argument("--bound", action="store_true",
                        help=f"also time {BOUND!r}: every operation of it is also in the step with dropout, so "
                             "its time is a lower bound for any dropout of lorakit's design")
    args = parser.parse_args(argv)
    C.setup(args.threads)

    vocab = C.base_model().config.vocab_size
    ids = C.token_batch(vocab)
    with tempfile.TemporaryDirectory() as out:
        steps = [TrainerStep(REFERENCE, peft_model(), ids, out, optim=args.optim),
                 TrainerStep("Trainer + lorakit adapters", lorakit_model(), ids, out, optim=args.optim),
                 TrainerStep("Trainer + lorakit adapters + chunked loss", lorakit_model(), ids, out,
                             chunked_loss=True, optim=args.optim)]
        if args.bound:
            steps.append(TrainerStep(BOUND, lorakit_model(dropout=0.0), ids, out, chunked_loss=True, optim=args.optim))
        first = {s.name: s.step().item() for s in steps}  # also the warm-up (optimizer states exist)
        print("first-step loss: " + ", ".join(f"{n} {v:.5f}" for n, v in first.items()))
        timed = [C.Contender(s.name, s.step) for s in steps]
        floors = C.time_with_floors(timed, args.reps)  # each step's matrix products alone, interleaved
        peaks = {s.name: s.peak_memory() for s in steps} if not args.no_memory else {}

    ref = timed[0]
    results, rows = {}, []
    for c in timed:
        result = {"median_s": round(c.median, 4), "times_s": [round(t, 4) for t in c.times],
                  "time_ratio": round(c.median / ref.median, 3), "first_loss": first[c.name],
                  "matmul_floor_s": round(floors[c.name], 4), "floor_ratio": round(floors[c.name] / ref.median, 3)}
        row = [c.name, f"{c.median:.2f} s", f"{ids.numel() / c.median:,.0f}", f"{result['time_ratio']:.2f}",
               f"{floors[c.name]:.2f} s", f"{result['floor_ratio']:.2f}"]
        if peaks:
            result.update(peak_bytes=peaks[c.name], memory_ratio=round(peaks[c.name] / peaks[ref.name], 3))
            row += [C.mib(peaks[c.name]), f"{result['memory_ratio']:.2f}"]
        results[c.name] = result
        rows.append(row)
    header = ["step", "median time", "tokens/s", f"time / {ref.name}", "matmul floor", f"floor / {ref.name}"]
    if peaks:
        header += ["peak memory", f"memory / {ref.name}"]
    print(f"\nTrainer step: SmolLM2-135M fp32, batch {C.BATCH} x {C.SEQ}, r={C.RANK}, dropout {C.DROPOUT}, "
          f"optim {args.optim}, {args.reps} interleaved reps, {torch.get_num_threads()} threads")
    print(C.table(header, rows))
    print(json.dumps({"bench": "trainer_step", "reps": args.reps, "threads": torch.get_num_threads(),
                      "optim": args.optim, "reference": ref.name, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
