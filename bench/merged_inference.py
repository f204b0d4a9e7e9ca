"""Inference latency with a LoRA adapter: merged (merge_and_unload) and unmerged, lorakit vs peft.

    .venv/bin/python bench/merged_inference.py [--reps 7] [--batch 1] [--seq 128]

One forward pass (prompt processing, no generation), eval mode, torch.inference_mode, float32,
SmolLM2-135M-Instruct with the same r=16 all-linear adapter (the same seeded random A and B in both, so
the adapter is not a no-op and the logits can be compared) in lorakit and in peft. After merging both are plain transformers models, so their latency
should match the base model's; unmerged, every adapted layer adds the two small matrix products.
Medians of interleaved repetitions (common.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402
import lora_step  # noqa: E402


def randomize_adapters(model, seed=0):
    """Seeded A and B in named_parameters order (the same module order in lorakit and peft)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    C.setup(2)
    import lorakit

    base = C.base_model().eval()
    ids = C.token_batch(base.config.vocab_size, args.batch, args.seq)
    ours, theirs = lora_step.lorakit_model().eval(), lora_step.peft_model().eval()
    randomize_adapters(ours)
    randomize_adapters(theirs)
    models = {"base model": base, "lorakit unmerged": ours, "peft unmerged": theirs}
    ours_m, theirs_m = lora_step.lorakit_model().eval(), lora_step.peft_model().eval()
    randomize_adapters(ours_m)
    randomize_adapters(theirs_m)
    models["lorakit merged"] = lorakit.merge_and_unload(ours_m)
    models["peft merged"] = theirs_m.merge_and_unload()
    with torch.inference_mode():
        logits = {k: m(ids).logits for k, m in models.items()}
    diff = (logits["lorakit unmerged"] - logits["peft unmerged"]).abs().max().item()
    diff_m = (logits["lorakit merged"] - logits["lorakit unmerged"]).abs().max().item()
    print(f"max |logits| difference: lorakit vs peft {diff:.2e}, lorakit merged vs unmerged {diff_m:.2e}")

    def forward(model):
        def run():
            with torch.inference_mode():
                model(ids)
        return run

    timed = [C.Contender(k, forward(m)) for k, m in models.items()]
    C.time_alternating(timed, reps=args.reps, warmup=1, verbose=False)
    ref = timed[0].median
    rows = [[c.name, f"{c.median * 1e3:.0f} ms", f"{args.batch * args.seq / c.median:,.0f}", f"{c.median / ref:.2f}"]
            for c in timed]
    print(f"\nforward of {args.batch} x {args.seq} tokens, float32, {args.reps} interleaved reps")
    print(C.table(["model", "median latency", "tokens/s", "time / base"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
