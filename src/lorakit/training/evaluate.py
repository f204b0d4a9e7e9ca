"""Evaluation: held-out loss, greedy generation and exact match, for `lorakit train` (before, during
and after training) and `lorakit eval` alike.

The held-out loss is the objective's training loss itself (objectives: loss.SummedLoss for SFT)
divided by its items: for SFT the mean cross-entropy per supervised token, in nats; for DPO / ORPO
the mean loss per pair, with the objective's metrics (pair_accuracy, rewards/...) averaged over the
held-out pairs. So held-out and training losses can be compared.

Retention (eval.retention) measures forgetting on general text the run does not train on: the
mean over the retention texts' scored tokens t of

    KL(base || tuned)_t = Σ_v p_base(v | x<t) (log p_base(v | x<t) - log p_tuned(v | x<t))

in nats per token. The base distributions are the model's own before its first step (adapters at
their initial value, which for LoRA's B = 0 is the base exactly, and for PiSSA/OLoRA, whose frozen
weight was rewritten, the only place the base still is), computed once and kept on the CPU, so
the KL before training is exactly 0 and works for full fine-tuning too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..config import DEFAULT_MAX_NEW_TOKENS, RunConfig
from ..data import IGNORE, Dataset, Record, build_dataset, collate, end_of_turn_ids, read_data
from ..preference_data import collate_pairs
from .objectives import SFT, Objective, objective_for, sequence_logps

if TYPE_CHECKING:
    from .setup import Prepared


@torch.no_grad()
def heldout(model, dataset: Dataset, pad_id: int, batch_size: int,
            objective: Objective = SFT()) -> tuple[float, dict[str, float]]:
    """(the objective's mean loss per item over the dataset, the mean of each of its metrics)."""
    was_training = model.training
    model.eval()
    summed = objective.loss(model)  # the training loss itself, so held-out and training losses agree
    total, count, sums = 0.0, 0, {}
    for i in range(0, len(dataset.examples), batch_size):
        batch = {k: v.to(model.device) for k, v in objective.collate(dataset.examples[i:i + batch_size], pad_id).items()}
        total += summed(**batch).item()
        count += objective.items(batch)
        for k, v in objective.metric_sums(summed).items():
            sums[k] = sums.get(k, 0.0) + v
    model.train(was_training)
    if count == 0:
        raise ValueError(f"none of the {len(dataset.examples)} held-out examples has a token to score "
                         "(every answer is empty or truncated away): there is no loss to report")
    return total / count, {k: v / count for k, v in sums.items()}


def heldout_loss(model, dataset: Dataset, pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per supervised token over the dataset."""
    return heldout(model, dataset, pad_id, batch_size)[0]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int | None, batch_size: int) -> list[str]:
    """Greedy continuations of the prompts (batched, left-padded), decoded without the prompt and
    without special tokens; each stops at an end-of-turn token (data.end_of_turn_ids). max_new_tokens
    None: config.DEFAULT_MAX_NEW_TOKENS (eval.max_new_tokens not derived from test references)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            # stop at the EOS or the chat template's end-of-turn token; decode without special tokens
            out = model.generate(**enc, max_new_tokens=max_new_tokens or DEFAULT_MAX_NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=end_of_turn_ids(tokenizer))
            new = out[:, enc["input_ids"].shape[1]:]
            outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def exact_match_accuracy(model, tokenizer, dataset: Dataset, max_new_tokens: int, batch_size: int,
                         limit: int | None = None) -> tuple[float, list[dict]]:
    """(fraction of exact matches, one row per example) over the examples that have a prompt and a
    reference (NaN and no rows when none has); tasks.exact_match compares."""
    from ..tasks import exact_match

    examples = [e for e in dataset.examples if e.prompt is not None and e.reference is not None][:limit]
    if not examples:
        return float("nan"), []
    predictions = generate(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size)
    rows = [{"prompt": e.prompt, "reference": e.reference, "prediction": p, "correct": exact_match(p, e.reference)}
            for e, p in zip(examples, predictions)]
    return sum(r["correct"] for r in rows) / len(rows), rows


# The default retention texts: the base model's greedy answers to these prompts, about nothing a
# fine-tuning task is likely to teach.
NEUTRAL_PROMPTS = (
    "What is the capital of France?",
    "Explain why the sky is blue.",
    "Write a short poem about the sea.",
    "How many days are there in a leap year?",
    "Give three tips for staying healthy.",
    "What does a thermometer measure?",
    "Describe how to make a cup of tea.",
    "Who wrote Romeo and Juliet?",
)
RETENTION_NEW_TOKENS = 48     # the length of each generated answer
RETENTION_MAX_TOKENS = 4096   # scored tokens at most: the base distributions take tokens x vocab x 4 bytes
RETENTION_BATCH = 8           # texts per forward: the logits take batch x length x vocab x 4 bytes


@dataclass
class Retention:
    """The retention texts as batches and the base model's next-token log-probabilities on them."""

    batches: list[dict[str, torch.Tensor]]   # collate()'s input_ids, attention_mask, labels: (B, T)
    reference: list[torch.Tensor]            # per batch: (scored tokens, vocab) log p_base, float32, CPU

    def save(self, path: Path) -> None:
        from ..files import replacing

        with replacing(path) as tmp:
            torch.save({"batches": self.batches, "reference": self.reference}, tmp)

    @classmethod
    def load(cls, path: Path) -> Retention:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return cls(saved["batches"], saved["reference"])


def retention_dataset(model, tokenizer, config: RunConfig) -> Dataset:
    """eval.retention's texts: a file's records (the tokens they supervise are scored), or with
    eval.retention true the model's greedy answers to NEUTRAL_PROMPTS (the answers are scored)."""
    max_length = config.data.max_length if isinstance(config.data.max_length, int) else 256
    if isinstance(config.eval.retention, str):
        dataset = build_dataset(read_data(config.eval.retention), tokenizer, "auto", max_length)
        if dataset.format == "preference":
            raise ValueError(f"eval.retention={config.eval.retention!r}: preference pairs cannot be scored as "
                             "retention text; give text, prompt/completion or chat records")
    else:
        chat = bool(getattr(tokenizer, "chat_template", None))
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) if chat else p + "\n"
                   for p in NEUTRAL_PROMPTS]
        answers = generate(model, tokenizer, prompts, RETENTION_NEW_TOKENS, RETENTION_BATCH)
        records = [Record({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                          if chat else {"prompt": q, "completion": a}, f"retention[{i}]")
                   for i, (p, q, a) in enumerate(zip(NEUTRAL_PROMPTS, prompts, answers))]
        dataset = build_dataset(records, tokenizer, "auto", max_length)
    if not 0 < dataset.supervised_tokens <= RETENTION_MAX_TOKENS:
        raise ValueError(f"eval.retention={config.eval.retention!r}: the retention texts score "
                         f"{dataset.supervised_tokens} tokens; they must score between 1 and {RETENTION_MAX_TOKENS} "
                         "(the base distributions are kept in memory: use fewer or shorter records)")
    return dataset


@torch.no_grad()
def _log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(scored tokens, vocab) float32 log-probabilities of the tokens the batch's labels supervise."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    model.train(was_training)
    scored = batch["labels"][:, 1:].to(device) != IGNORE   # position t predicts token t + 1
    return torch.log_softmax(logits[:, :-1][scored].float(), dim=-1)


def retention_reference(model, tokenizer, config: RunConfig) -> Retention:
    """The retention texts and the model's distributions on them: call before the first step."""
    dataset = retention_dataset(model, tokenizer, config)
    pad = tokenizer.pad_token_id
    batches = [collate(dataset.examples[i:i + RETENTION_BATCH], pad)
               for i in range(0, len(dataset.examples), RETENTION_BATCH)]
    return Retention(batches, [_log_probs(model, b).cpu() for b in batches])


@torch.no_grad()
def retention_kl(model, retention: Retention) -> float:
    """Mean KL(base || model) per scored token over the retention texts, in nats (module docstring)."""
    total, count = 0.0, 0
    for batch, base in zip(retention.batches, retention.reference):
        tuned = _log_probs(model, batch)
        base = base.to(tuned.device)
        total += float((base.exp() * (base - tuned)).sum())   # Σ_t Σ_v p_base (log p_base - log p_tuned)
        count += base.shape[0]
    return total / count


def pair_scores(model, pairs, pad_id: int, batch_size: int) -> dict:
    """Over the pairs (preference_data.PreferenceDataset): pair_accuracy, the fraction whose chosen
    answer has the higher total log-probability log π(y_w | x) > log π(y_l | x) (a tie is no win, as
    dpo_loss counts it), and the mean total log-probabilities logps/chosen, logps/rejected (nats per
    answer, objectives.sequence_logps: the answer's tokens only, the prompt carries none)."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for i in range(0, len(pairs.examples), batch_size):
            batch = collate_pairs(pairs.examples[i:i + batch_size], pad_id)   # 2B rows: B chosen, B rejected
            logps = sequence_logps(model, **{k: v.to(model.device) for k, v in batch.items()}).cpu()
            chosen.append(logps[:len(logps) // 2])
            rejected.append(logps[len(logps) // 2:])
    model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    return {"pairs": len(chosen), "pair_accuracy": float((chosen > rejected).float().mean()),
            "logps/chosen": float(chosen.mean()), "logps/rejected": float(rejected.mean())}


def evaluate(model, tokenizer, prepared: Prepared, config: RunConfig, generation: bool,
             objective: Objective | None = None, retention: Retention | None = None) -> dict:
    """val_loss and the objective's held-out metrics (SFT: val_ppl; DPO / ORPO: pair_accuracy,
    rewards/...) on the validation data; with generation (and eval.generate), also exact_match,
    samples and eval_seconds on the test data; with retention, retention_kl. objective:
    config.objective's by default."""
    objective = objective or objective_for(config)
    out = {}
    pad = tokenizer.pad_token_id
    if prepared.validation:
        out["val_loss"], means = heldout(model, prepared.validation, pad, config.eval.batch_size, objective)
        out.update(objective.heldout_metrics(out["val_loss"], means))
    if generation and config.eval.generate and prepared.test:
        start = time.perf_counter()
        out["exact_match"], out["samples"] = exact_match_accuracy(
            model, tokenizer, prepared.test, config.eval.max_new_tokens, config.eval.batch_size, config.eval.limit)
        out["eval_seconds"] = time.perf_counter() - start
    if retention is not None:
        out["retention_kl"] = retention_kl(model, retention)
    return out


def evaluate_run(model, raw, tokenizer, prepared: Prepared, config: RunConfig, ctx: distributed.Context,
                 generation: bool, objective: Objective | None = None, retention: Retention | None = None) -> dict | None:
    """evaluate(raw) during or after training; the result on rank 0, None elsewhere.

    Without FSDP rank 0 evaluates alone (the others wait). Under FSDP every forward all-gathers
    shards, a collective: every rank runs the same evaluation on the same examples, with the
    root's parameters gathered (distributed.unsharded_root). The ranks stay in step because they
    compute bit-identical logits (same gathered weights, same inputs), so greedy decoding stops
    at the same length everywhere. Memory stays sharded: only the root's parameters and one
    layer at a time are gathered.
    """
    if not (ctx.main or distributed.sharded(model)):
        return None
    with distributed.unsharded_root(model):
        out = evaluate(raw, tokenizer, prepared, config, generation, objective, retention)
    return out if ctx.main else None


def retention_run(model, raw, tokenizer, config: RunConfig, ctx: distributed.Context, saved: Path,
                  resumed: bool) -> Retention | None:
    """eval.retention's reference for a run, on the ranks that evaluate (evaluate_run's rule): a fresh
    run computes it (before its first step) and rank 0 keeps it in `saved`; a resumed run reads it.
    None when retention is off, on a rank that does not evaluate, or when a resumed run has no
    reference (it started without eval.retention: the base is gone)."""
    if not config.eval.retention or not (ctx.main or distributed.sharded(model)):
        return None
    if resumed:
        return Retention.load(saved) if saved.is_file() else None
    with distributed.unsharded_root(model):
        retention = retention_reference(raw, tokenizer, config)
    if ctx.main:
        retention.save(saved)
    return retention
