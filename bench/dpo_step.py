"""A DPO training step: lorakit vs trl's DPOTrainer + peft, side by side in one process.

    .venv/bin/python bench/dpo_step.py            # SmolLM2-135M, 4 pairs of builtin:stardate_pairs, 5 reps
    .venv/bin/python bench/dpo_step.py --quick    # 2 pairs, 2 reps: a smoke run
    .venv/bin/python bench/dpo_step.py --memory   # peak memory only, no timed steps (load does not change it)

Both train the same base (SmolLM2-135M-Instruct, float32, loaded once and deep-copied) with the same
LoRA adapter (r=16, alpha=32, dropout 0, every linear layer of the blocks; B = 0 and lorakit's A
copied into peft's, so both start equal, at the reference), on the same token ids: one batch of B pairs of the built-in
stardate preference task, rendered and tokenised by lorakit (preference_data.collate_pairs: 2B rows,
the chosen first; trl's completion_mask is where lorakit's labels are not ignored), with DPO's
sigmoid loss, beta 0.1, the reference being the model with its adapters disabled (no reference
copy, no precomputed log-probabilities), and AdamW (lr 1e-4, no weight decay).

  lorakit: training.objectives.dpo().loss(model) (sequence_logps: the head only on the answer tokens),
           the sum over pairs divided by B, backward, AdamW step.
  trl:     DPOTrainer(model=peft model, ref_model=None).training_step on that batch (its fused LM head,
           reference forward under peft's disable_adapter), then its AdamW step.

Times are medians of interleaved steps (common.time_alternating). Peak memory is the CPU allocator's
peak during one more step, above what is resident before it (weights, adapters, optimizer states:
the same for both), and the total with what is resident. The machine is shared (2 CPU cores, other
agents running when this was written): time ratios are noisy, memory ratios are not. The last line
is a JSON object of the ratios lorakit / trl.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETA = 1e-4, 0.1


def pairs_batch(tokenizer, pairs: int) -> dict[str, torch.Tensor]:
    """The first `pairs` training pairs of builtin:stardate_pairs as lorakit collates them (2B rows)."""
    from lorakit.data import build_dataset, read_data
    from lorakit.preference_data import collate_pairs

    records = read_data("builtin:stardate_pairs", "train")[:pairs]
    return collate_pairs(build_dataset(records, tokenizer).examples, tokenizer.pad_token_id)


def lorakit_step(base, batch, pairs: int):
    from lorakit import LoraConfig, add_lora
    from lorakit.training.objectives import dpo

    model = add_lora(base, LoraConfig(r=16, alpha=32, targets=TARGETS))
    model.train()
    loss_module = dpo(BETA).loss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)

    def step():
        loss = loss_module(**batch) / pairs  # the mean DPO loss per pair, as the loop divides
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, opt, step


def trl_step(base, ours, tokenizer, batch, pairs: int, out_dir: str):
    import peft
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    # a stand-in dataset: DPOTrainer needs one to start; the step is fed lorakit's batch
    rows = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * pairs)
    args = DPOConfig(output_dir=out_dir, per_device_train_batch_size=pairs, learning_rate=LR, weight_decay=0.0,
                     beta=BETA, loss_type=["sigmoid"], optim="adamw_torch", report_to=[], use_cpu=True,
                     save_strategy="no", logging_strategy="no", precompute_ref_log_probs=False,
                     gradient_checkpointing=False, dataloader_num_workers=0)
    # trl + peft as documented: the base and a peft_config; trl adds the adapter, and its reference is the
    # model with that adapter disabled (a PeftModel handed in would get a second "ref" adapter instead)
    trainer = DPOTrainer(model=base, ref_model=None, args=args, train_dataset=rows, processing_class=tokenizer,
                         peft_config=peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    theirs = {n.removeprefix("base_model.model."): p for n, p in trainer.model.named_parameters() if "lora_" in n}
    trained = dict((n, p) for n, p in ours.named_parameters() if p.requires_grad)
    assert theirs.keys() == trained.keys(), (sorted(theirs.keys() ^ trained.keys())[:3])
    with torch.no_grad():  # the same starting adapter (B = 0 in both: the policy starts at the reference)
        for name, p in theirs.items():
            p.copy_(trained[name])
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's train loop sets before a step
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}

    def step():
        loss = trainer.training_step(trainer.model, dict(inputs))
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return trainer.model, trainer.optimizer, step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 pairs, 2 reps: a smoke run")
    parser.add_argument("--memory", action="store_true", help="peak memory only: no timed steps")
    args = parser.parse_args()
    pairs, reps = (2, 2) if args.quick else (4, 5)
    C.setup()
    from lorakit.models import load_model

    base, tokenizer = load_model(dtype=torch.float32)
    batch = pairs_batch(tokenizer, pairs)
    torch.manual_seed(0)
    ours, ours_opt, ours_step = lorakit_step(copy.deepcopy(base), batch, pairs)
    with tempfile.TemporaryDirectory() as out_dir:
        theirs, theirs_opt, theirs_step = trl_step(copy.deepcopy(base), ours, tokenizer, batch, pairs, out_dir)
        del base
        steps = {"lorakit": ours_step, "trl": theirs_step}
        first = {name: step() for name, step in steps.items()}  # also the warm-up: AdamW's states exist after it
        print(f"{pairs} pairs, {batch['input_ids'].shape[1]} tokens per row, "
              f"{int((batch['labels'][:, 1:] != -100).sum())} scored answer tokens")
        print(f"first-step DPO losses (ln 2 = 0.693147: the policy is its reference): "
              f"lorakit {first['lorakit']:.6f}, trl {first['trl']:.6f}")
        second = {name: step() for name, step in steps.items()}  # after one identical AdamW step
        print(f"second-step DPO losses: lorakit {second['lorakit']:.6f}, trl {second['trl']:.6f}")
        contenders = [C.Contender(name, step) for name, step in steps.items()]
        if not args.memory:
            C.time_alternating(contenders, reps, warmup=0)
        resident = {"lorakit": C.resident_bytes(*C.model_tensors(ours), *C.optimizer_tensors(ours_opt)),
                    "trl": C.resident_bytes(*C.model_tensors(theirs), *C.optimizer_tensors(theirs_opt))}
        peaks = {name: C.allocator_peak(step) for name, step in steps.items()}
    print(C.table(["DPO step", "median time", "step peak (above resident)", "resident", "total peak"],
                  [[c.name, f"{c.median:.3f}s" if c.times else "-", C.mib(peaks[c.name]), C.mib(resident[c.name]),
                    C.mib(peaks[c.name] + resident[c.name])] for c in contenders]))
    print(json.dumps({"time_ratio": round(contenders[0].median / contenders[1].median, 3) if not args.memory else None,
                      "step_peak_memory_ratio": round(peaks["lorakit"] / peaks["trl"], 3),
                      "total_peak_memory_ratio": round((peaks["lorakit"] + resident["lorakit"])
                                                       / (peaks["trl"] + resident["trl"]), 3),
                      "pairs": pairs, "reps": reps}))


if __name__ == "__main__":
    main()
