"""Evaluation: held-out loss, greedy generation and exact match, for `lorakit train` (before, during
and after training) and `lorakit eval` alike.

The held-out loss is the objective's training loss itself (objectives: loss.SummedLoss for SFT)
divided by its items: for SFT the mean cross-entropy per supervised token, in nats; for DPO / ORPO
the mean loss per pair, with the objective's metrics (pair_accuracy, rewards/...) averaged over the
held-out pairs. So held-out and training losses can be compared.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..config import DEFAULT_MAX_NEW_TOKENS, RunConfig
from ..data import Dataset, end_of_turn_ids
from .objectives import SFT, Objective, objective_for

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


def evaluate(model, tokenizer, prepared: Prepared, config: RunConfig, generation: bool,
             objective: Objective | None = None) -> dict:
    """val_loss and the objective's held-out metrics (SFT: val_ppl; DPO / ORPO: pair_accuracy,
    rewards/...) on the validation data; with generation (and eval.generate), also exact_match,
    samples and eval_seconds on the test data. objective: config.objective's by default."""
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
    return out


def evaluate_run(model, raw, tokenizer, prepared: Prepared, config: RunConfig, ctx: distributed.Context,
                 generation: bool, objective: Objective | None = None) -> dict | None:
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
        out = evaluate(raw, tokenizer, prepared, config, generation, objective)
    return out if ctx.main else None
