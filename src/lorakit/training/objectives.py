"""Training objectives: what one optimizer step minimises, as a seam the loop does not look behind.

An objective supplies
    micro_batches(dataset, step, config, ctx, pad_id)  this rank's micro-batches of optimizer step
                                                      `step` (its batch layout: which examples, collated how)
    loss(model)                                       the nn.Module that DDP / FSDP wrap: forward(**batch)
                                                      returns the SUM of per-item losses of the batch; it
                                                      keeps the model as `.model` (FSDP shards that)
    items(batch)                                      how many items that sum runs over
    tokens(batch)                                     tokens the batch feeds the model (throughput)

and the loop computes, over the global batch B (every micro-batch of every rank),

    L = Σ_{batch ∈ B} loss(batch) / Σ_{batch ∈ B} items(batch)

so every item weighs the same however the batch is split over micro-batches and ranks. Adding an
objective (a preference loss such as DPO: items = pairs) is a new class here; the loop stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .. import distributed
from ..config import RunConfig
from ..data import Dataset, batch_at, collate
from ..loss import SummedLoss, supervised_tokens


class Objective(Protocol):
    def micro_batches(self, dataset: Dataset, step: int, config: RunConfig, ctx: distributed.Context,
                      pad_id: int) -> list[dict[str, torch.Tensor]]: ...

    def loss(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def items(self, batch: dict[str, torch.Tensor]) -> int: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int: ...


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning: next-token cross-entropy on the supervised tokens (the completion,
    or every token with data.train_on_inputs), through the chunked loss (loss.SummedLoss). Items are
    supervised tokens, so the step's loss is the mean cross-entropy per supervised token."""

    def micro_batches(self, dataset: Dataset, step: int, config: RunConfig, ctx: distributed.Context,
                      pad_id: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of optimizer step `step` (1-based). Global micro-batch i holds
        batch_size x world examples; rank r takes the r-th slice, so N ranks see exactly the examples
        a single process with batch_size x N sees."""
        t = config.train
        out = []
        for micro in range(t.grad_accum):
            examples = batch_at(dataset, (step - 1) * t.grad_accum + micro, t.batch_size * ctx.world, t.seed)
            out.append(collate(examples[ctx.rank * t.batch_size:(ctx.rank + 1) * t.batch_size], pad_id))
        return out

    def loss(self, model: torch.nn.Module) -> torch.nn.Module:
        return SummedLoss(model)

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return supervised_tokens(batch)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())
