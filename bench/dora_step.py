"""A DoRA training step: lorakit vs peft, side by side in one process.

    .venv/bin/python bench/dora_step.py            # hidden 512, 4 layers, batch 4 x 128, 5 reps (--reps N)
    .venv/bin/python bench/dora_step.py --quick    # a smoke run (tiny sizes, 2 reps): numbers mean nothing
    .venv/bin/python bench/dora_step.py --memory-only   # peak memory alone (load-independent, no timing)
    .venv/bin/python bench/dora_step.py --lora     # also plain LoRA on the same model, lorakit's and peft's:
                                                   # what DoRA adds over LoRA in each library
    .venv/bin/python bench/dora_step.py --dropout 0.05  # adapters with dropout: both libraries then apply
                                                   # W to the dropped input too (a second base product)

Both get the same seeded Llama-shaped model built from a config (float32, no download), the same
DoRA adapter (r=16, alpha=32, dropout 0 or --dropout, every linear layer but the head; lorakit's adapter is
copied into peft's so both start equal), the same tokens and SGD. A step is forward, loss,
backward, optimizer step, zero_grad. Times are medians of interleaved runs (common.py), with each
step's matmul floor (common.matmul_replay: its matrix products alone; lorakit's floor over peft's
step is the least time ratio those products allow on this BLAS); peak
memory is the CPU allocator's peak during one more step. The machine is shared (2 CPU cores, 4
agents when this was written): only the ratios measured side by side mean anything, and even
they are noisy. The last line is a JSON object of the ratios lorakit / peft.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402


def llama(hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return LlamaForCausalLM(config).train()


def models(hidden: int, layers: int, dora: bool = True, dropout: float = 0.0):
    """(lorakit's model, peft's) with the same adapters; dora=False: plain LoRA, for the decomposition."""
    import peft

    from lorakit import LoraConfig, add_lora

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ours = add_lora(llama(hidden, layers), LoraConfig(r=16, alpha=32, targets=targets, dora=dora, init="random",
                                                      dropout=dropout))
    theirs = peft.get_peft_model(llama(hidden, layers), peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets,
                                                                        use_dora=dora, lora_dropout=dropout))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector.default")
                key = key.replace(".weight", ".default.weight") if "magnitude" not in key else key
                p.copy_(ours_params[key])
    return ours, theirs


def stepper(model, tokens):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 reps: a smoke run")
    parser.add_argument("--reps", type=int, default=5, help="interleaved timed repetitions (median reported)")
    parser.add_argument("--lora", action="store_true", help="also time plain LoRA (lorakit, peft) on the same model")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the adapters' dropout, both libraries (default 0; first-step losses then differ)")
    parser.add_argument("--memory-only", action="store_true",
                        help="only the peak memory (the allocator's accounting does not depend on load; no timing)")
    args = parser.parse_args()
    hidden, layers, batch, seq, reps = (64, 2, 2, 32, 2) if args.quick else (512, 4, 4, 128, args.reps)
    C.setup()
    ours, theirs = models(hidden, layers, dropout=args.dropout)
    tokens = C.token_batch(2048, batch, seq)
    steps = {"lorakit": stepper(ours, tokens), "peft": stepper(theirs, tokens)}
    if args.lora:
        plain = models(hidden, layers, dora=False, dropout=args.dropout)
        steps.update({"lorakit LoRA": stepper(plain[0], tokens), "peft LoRA": stepper(plain[1], tokens)})
    first = {name: step() for name, step in steps.items()}  # also the warm-up
    print("first-step losses: " + ", ".join(f"{name} {loss:.6f}" for name, loss in first.items()))
    if args.memory_only:
        peaks = {name: C.allocator_peak(step) for name, step in steps.items()}
        print(C.table(["step (lorakit, peft: DoRA)", "peak memory"], [[name, C.mib(p)] for name, p in peaks.items()]))
        print(json.dumps({"peak_memory_ratio": round(peaks["lorakit"] / peaks["peft"], 3), "hidden": hidden,
                          "layers": layers, "tokens": batch * seq, "dropout": args.dropout}))
        return
    contenders = [C.Contender(name, step) for name, step in steps.items()]
    floors = C.time_with_floors(contenders, reps)  # each step's matrix products alone, interleaved
    median_peft = contenders[1].median
    peaks = {name: C.allocator_peak(step) for name, step in steps.items()}
    print(C.table(["step (lorakit, peft: DoRA)", "median time", "matmul floor", "floor / peft's step", "peak memory"],
                  [[c.name, f"{c.median:.3f}s", f"{floors[c.name]:.3f}s",
                    f"{floors[c.name] / median_peft:.2f}", C.mib(peaks[c.name])] for c in contenders]))
    median = {c.name: c.median for c in contenders}
    lora_ratios = {f"{name.lower().replace(' ', '_')}_over_peft_dora": round(median[name] / median["peft"], 3)
                   for name in ("lorakit LoRA", "peft LoRA") if name in median}
    print(json.dumps({"time_ratio": round(median["lorakit"] / median["peft"], 3), **lora_ratios,
                      "floor_ratio": round(floors["lorakit"] / median["peft"], 3),
                      "peak_memory_ratio": round(peaks["lorakit"] / peaks["peft"], 3),
                      "hidden": hidden, "layers": layers, "tokens": batch * seq, "dropout": args.dropout,
                      "reps": reps}))


if __name__ == "__main__":
    main()
