"""How the defaults of `lorakit train` were chosen: base accuracy, then LoRA (peft) + a plain loop.

This is a measurement script, not part of the library: it uses peft as the reference LoRA
implementation and a hand-written training loop, and prints every number the choice rests on
(held-out exact match before/after, training wall time, tokens/s, eval time).

    HF_HUB_OFFLINE=1 .venv/bin/python examples/explore_default_task.py            # the defaults
    HF_HUB_OFFLINE=1 .venv/bin/python examples/explore_default_task.py --qlora    # QLoRA stand-in

--qlora is a rough QLoRA stand-in: the frozen linear weights of the decoder layers are replaced by
their NF4 round trip (bitsandbytes quantize_4bit/dequantize_4bit, blocksize 64) before LoRA is
added, so the adapter trains against 4-bit-rounded weights. It measures accuracy, not speed.

Results (2-core AMD EPYC, torch 2.13 CPU, 2 threads; the machine was shared with other engineers'
test runs, load average 3-6, so wall times are upper bounds; first step of a run can stall 40-60 s):

    task      config                                   examples  train time     held-out EM (200)
    stardate  base model                                      -  -              0.0%  (eval 184 s*)
    stardate  LoRA r=8 a=16 all-linear lr 2e-3, 30 steps    480  188 s (110 tok/s)  100.0% (eval 34 s)
    stardate  same, NF4 fake-quantized base (QLoRA)         480  171 s (121 tok/s)  100.0% (eval 97 s)
    stardate  LoRA r=16 a=32 lr 2e-3, 60 steps              960  338 s          100% on 50 from step 20
    zorbish   base model                                      -  -              0.0%  (eval 69 s*)
    zorbish   LoRA r=16 a=32 lr 2e-3, 60 steps              960  743 s (heavy load)  6% on 50
    (* base eval runs to max_new_tokens: the base model never stops early)

Steady-state speed between loaded moments: ~2.9 s per step of 16 x 43 tokens (~240 tok/s).
Commands:

    HF_HUB_OFFLINE=1 .venv/bin/python examples/explore_default_task.py --task stardate \
        --r 8 --alpha 16 --steps 30 --warmup 5 --batch 16 --lr 2e-3 [--qlora] [--skip-base-eval]
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
import torch.nn.functional as F

from lorakit.models import load_model
from lorakit.tasks import accuracy, make_task, normalize

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """Token ids of prompt and completion, tokenized separately so the boundary is exact."""
    prompt = tokenizer(record["prompt"], add_special_tokens=False).input_ids
    completion = tokenizer(record["completion"], add_special_tokens=False).input_ids
    return prompt, completion


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids (B, T), attention_mask (B, T), and a (B, T) mask of the positions whose
    *next* token is a completion token: the only positions the loss is taken on."""
    T = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), T), dtype=torch.long)
    predicts_completion = torch.zeros((len(batch), T), dtype=torch.bool)
    for i, (p, c) in enumerate(batch):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor(p + c)
        attn[i, :n] = 1
        predicts_completion[i, len(p) - 1 : n - 1] = True
    return ids, attn, predicts_completion


def completion_loss(model, ids, attn, predicts_completion):
    """Cross-entropy on completion tokens only. The lm_head (49152 x 576, ~20% of the FLOPs) is
    applied only at those positions instead of at every position."""
    hidden = model.get_base_model().model(input_ids=ids, attention_mask=attn).last_hidden_state  # (B, T, d)
    h = hidden[:, :-1][predicts_completion[:, :-1]]  # (N, d): positions predicting a completion token
    targets = ids[:, 1:][predicts_completion[:, :-1]]  # (N,)
    logits = model.get_base_model().lm_head(h)  # (N, V)
    return F.cross_entropy(logits.float(), targets)


@torch.no_grad()
def evaluate(model, tokenizer, records: list[dict], batch_size: int = 50, max_new_tokens: int = 12):
    """Greedy generation with left padding; returns (accuracy, predictions, seconds)."""
    model.eval()
    tokenizer.padding_side = "left"
    start = time.perf_counter()
    predictions = []
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
        predictions += tokenizer.batch_decode(out[:, enc.input_ids.shape[1] :], skip_special_tokens=False)
    seconds = time.perf_counter() - start
    return accuracy(predictions, [r["answer"] for r in records]), predictions, seconds


def fake_quantize_nf4(model, blocksize: int = 64):
    """Replace each decoder linear weight by its NF4 round trip (QLoRA's frozen-weight rounding)."""
    import bitsandbytes.functional as bnbf

    errs = []
    for name, module in model.model.layers.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.data
            q, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
            wq = bnbf.dequantize_4bit(q, state, quant_type="nf4").to(w.dtype)
            errs.append(((wq - w).norm() / w.norm()).item())
            module.weight.data = wq
    print(f"NF4 fake-quantized {len(errs)} linears, mean relative error {sum(errs) / len(errs):.4f}")


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup for `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="stardate")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--targets", default=",".join(ALL_LINEAR))
    ap.add_argument("--first-layer", type=int, default=0, help="LoRA only on layers >= this (shorter backward)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--time-limit", type=float, default=0, help="stop training after this many seconds (0: none)")
    ap.add_argument("--skip-base-eval", action="store_true")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate on 50 test records every N steps")
    ap.add_argument("--qlora", action="store_true", help="NF4 fake-quantize the frozen weights first")
    args = ap.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    from peft import LoraConfig, get_peft_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(None)
    print(f"load_model: {time.perf_counter() - t0:.2f}s")
    task = make_task(args.task, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    print(f"task {task.name}: {len(task.train)} train, {len(task.test)} test; sample:")
    for r in task.test[:3]:
        print(f"   {r['prompt'].splitlines()[-2]!r} -> {r['answer']!r}")

    if args.qlora:
        fake_quantize_nf4(model)
    if not args.skip_base_eval:
        acc, preds, secs = evaluate(model, tokenizer, task.test)
        print(f"BASE held-out exact match: {acc:.1%}  (eval {secs:.1f}s for {len(task.test)})")
        for r, p in list(zip(task.test, preds))[:3]:
            print(f"   want {r['answer']!r} got {normalize(p)!r}")

    layers = list(range(args.first_layer, model.config.num_hidden_layers))
    config = LoraConfig(
        r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.targets.split(","),
        layers_to_transform=layers if args.first_layer > 0 else None,
    )
    model = get_peft_model(model, config)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"LoRA r={args.r} alpha={args.alpha} targets={args.targets} layers>={args.first_layer}: "
          f"{n_trainable:,} trainable parameters")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    data = [encode(tokenizer, r) for r in task.train]
    lengths = [len(p) + len(c) for p, c in data]
    print(f"train tokens/example: mean {sum(lengths) / len(lengths):.1f}, max {max(lengths)}")
    rng = random.Random(args.seed)
    order: list[int] = []
    tokens_seen, examples_seen = 0, 0
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        if len(order) < args.batch:
            epoch = list(range(len(data)))
            rng.shuffle(epoch)
            order += epoch
        batch = [data[i] for i in order[: args.batch]]
        del order[: args.batch]
        ids, attn, mask = collate(batch, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = completion_loss(model, ids, attn, mask)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(attn.sum())
        examples_seen += len(batch)
        elapsed = time.perf_counter() - start
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:4d} loss {loss.item():.4f} lr {group['lr']:.2e} {elapsed:6.1f}s "
                  f"{tokens_seen / elapsed:.0f} tok/s", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            paused = time.perf_counter()
            acc, _, _ = evaluate(model, tokenizer, task.test[:50])
            print(f"   step {step + 1}: exact match on 50 test records {acc:.1%}", flush=True)
            model.train()
            start += time.perf_counter() - paused  # eval time is not training time
        if args.time_limit and elapsed > args.time_limit:
            print(f"time limit reached after {step + 1} steps")
            break
    train_secs = time.perf_counter() - start
    print(f"TRAIN: {step + 1} steps, {examples_seen} examples ({examples_seen / len(data):.2f} epochs), "
          f"{tokens_seen} tokens in {train_secs:.1f}s = {tokens_seen / train_secs:.0f} tok/s")

    acc, preds, secs = evaluate(model, tokenizer, task.test)
    print(f"AFTER held-out exact match: {acc:.1%}  (eval {secs:.1f}s for {len(task.test)})")
    wrong = [(r["answer"], normalize(p)) for r, p in zip(task.test, preds) if normalize(p) != r["answer"]]
    for want, got in wrong[:8]:
        print(f"   want {want!r} got {got!r}")


if __name__ == "__main__":
    main()
