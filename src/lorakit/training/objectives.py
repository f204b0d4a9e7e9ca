"""Training objectives: what one optimizer step minimises, as a seam the loop does not look behind.

An objective supplies
    micro_batches(dataset, step, config, ctx, pad_id)  this rank's micro-batches of optimizer step
                                                      `step` (its batch layout: which examples, collated how)
    collate(examples, pad_id)                         one batch of examples as the loss module takes it
                                                      (training and held-out evaluation)
    loss(model)                                       the nn.Module that DDP / FSDP wrap: forward(**batch)
                                                      returns the SUM of per-item losses of the batch; it
                                                      keeps the model as `.model` (FSDP shards that)
    items(batch)                                      how many items that sum runs over
    tokens(batch)                                     tokens the batch feeds the model (throughput)
    metric_sums(loss_module)                          the sums over the items of the loss module's last
                                                      forward of each per-item metric ({} for SFT)
    heldout_metrics(val_loss, means)                  what an evaluation reports beside val_loss, given
                                                      the held-out means of those metrics
    probe()                                           the smallest batch the loss module takes (FSDP's
                                                      first forward: distributed.wrap)
    data_problems(train, validation)                  what keeps these datasets from this objective
    plateau_progress                                  how its loss curve is judged for a plateau (monitor.
                                                      check_plateau's min_progress; None: not judged)

and the loop computes, over the global batch B (every micro-batch of every rank),

    L = Σ_{batch ∈ B} loss(batch) / Σ_{batch ∈ B} items(batch)      metric = Σ metric_sums / Σ items

so every item weighs the same however the batch is split over micro-batches and ranks.

Objectives: SFT (items = supervised tokens), and the preference objectives over pairs (items =
pairs): dpo (Rafailov et al. 2023; its IPO variant, Azar et al. 2023), whose reference model is the
same network with the adapters disabled (inject.disable_adapters), and orpo (Hong et al. 2024),
which needs no reference. objective_for(config) picks one by config.objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..config import RunConfig
from ..data import Dataset, batch_at, collate
from ..inject import disable_adapters
from ..loss import IGNORE_INDEX, SummedLoss, chunked_token_logps, head_input, supervised_tokens, supports_chunked_loss
from ..monitor import PLATEAU_MIN_PROGRESS
from ..preference_data import collate_pairs, is_preference


class Objective(Protocol):
    plateau_progress: float | None

    def micro_batches(self, dataset: Dataset, step: int, config: RunConfig, ctx: distributed.Context,
                      pad_id: int) -> list[dict[str, torch.Tensor]]: ...

    def collate(self, examples: list, pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def items(self, batch: dict[str, torch.Tensor]) -> int: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int: ...

    def metric_sums(self, loss_module: torch.nn.Module) -> dict[str, float]: ...

    def heldout_metrics(self, val_loss: float, means: dict[str, float]) -> dict[str, float]: ...

    def probe(self) -> dict[str, torch.Tensor]: ...

    def data_problems(self, train, validation) -> list[str]: ...


def global_micro_batches(collate_fn, dataset, step: int, config: RunConfig, ctx: distributed.Context,
                         pad_id: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of optimizer step `step` (1-based). Global micro-batch i holds
    batch_size x world examples; rank r takes the r-th slice, so N ranks see exactly the examples
    a single process with batch_size x N sees."""
    t = config.train
    out = []
    for micro in range(t.grad_accum):
        examples = batch_at(dataset, (step - 1) * t.grad_accum + micro, t.batch_size * ctx.world, t.seed)
        out.append(collate_fn(examples[ctx.rank * t.batch_size:(ctx.rank + 1) * t.batch_size], pad_id))
    return out


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning: next-token cross-entropy on the supervised tokens (the completion,
    or every token with data.train_on_inputs), through the chunked loss (loss.SummedLoss). Items are
    supervised tokens, so the step's loss is the mean cross-entropy per supervised token.
    monitor's plateau rule is tuned for this cross-entropy."""

    plateau_progress: ClassVar[float | None] = PLATEAU_MIN_PROGRESS

    def micro_batches(self, dataset: Dataset, step: int, config: RunConfig, ctx: distributed.Context,
                      pad_id: int) -> list[dict[str, torch.Tensor]]:
        """The examples of global_micro_batches; with data.padding_free each micro-batch is one row."""
        flat = config.data.padding_free
        return global_micro_batches(lambda examples, pad: collate(examples, pad, padding_free=flat),
                                    dataset, step, config, ctx, pad_id)

    def collate(self, examples: list, pad_id: int) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id)

    def loss(self, model: torch.nn.Module) -> torch.nn.Module:
        return SummedLoss(model)

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return supervised_tokens(batch)

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def metric_sums(self, loss_module: torch.nn.Module) -> dict[str, float]:
        return {}

    def heldout_metrics(self, val_loss: float, means: dict[str, float]) -> dict[str, float]:
        return {"val_ppl": math.exp(min(val_loss, 50))}

    def probe(self) -> dict[str, torch.Tensor]:
        one = torch.zeros(1, 2, dtype=torch.long)  # a single predicted token
        return {"input_ids": one, "attention_mask": torch.ones_like(one), "labels": one}

    def data_problems(self, train, validation) -> list[str]:
        return [f"{name}: holds preference records (prompt, chosen, rejected); they train with objective=dpo or "
                "objective=orpo, or give prompt/completion records for objective=sft"
                for name, data in (("data.train", train), ("validation", validation)) if is_preference(data)]


# --- preference objectives: a batch of B pairs is 2B rows, the B chosen sequences, then the B rejected ---


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   labels: torch.Tensor) -> torch.Tensor:
    """log π(y | x) of each row: Σ_t log softmax(z_t)[y_{t+1}] over the positions whose next label is
    not ignored (the answer's tokens), (N,) float32.

    Where the logits are exactly head(last hidden state) (loss.supports_chunked_loss), only those
    positions go through the output head, in chunks (loss.chunked_token_logps): no (n, V) logits,
    softmax or gradient is kept for backward, the largest part of a step's peak above the model's
    activations. Otherwise the model's logits are used. Logits are computed in the weight's dtype
    and upcast, as the training loss does."""
    targets = labels[:, 1:]                                             # (N, T-1): position t predicts t + 1
    keep = targets != IGNORE_INDEX
    if supports_chunked_loss(model):
        hidden, head = head_input(model, input_ids=input_ids, attention_mask=attention_mask)
        token_logps = chunked_token_logps(hidden[:, :-1][keep], head.weight, targets[keep], head.bias)  # (n,)
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep].float()
        token_logps = logits.gather(1, targets[keep][:, None])[:, 0] - logits.logsumexp(1)  # (n,)
    rows = keep.nonzero()[:, 0]                                         # the row of each answer token
    return torch.zeros(len(input_ids), dtype=torch.float32, device=token_logps.device).index_add(0, rows, token_logps)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss of each pair (B,), trl's metrics of each pair) from the policy's and the reference's
    log-probabilities of the chosen (y_w) and rejected (y_l) answers, each (B,).

    With the log-ratios  r_w = log π(y_w|x) - log π_ref(y_w|x),  r_l likewise:
      sigmoid (DPO, Rafailov et al. 2023, Eq. 7; ε = label_smoothing, conservative DPO):
          L = -(1 - ε) log σ(β (r_w - r_l)) - ε log σ(-β (r_w - r_l))
      ipo (IPO, Azar et al. 2023, Eq. 17; β is its τ), the log-ratios averaged over the answer tokens
          as trl does:  L = (r_w / |y_w| - r_l / |y_l| - 1 / (2β))²
    Metrics: rewards/chosen = β r_w, rewards/rejected = β r_l, rewards/accuracies = [β r_w > β r_l],
    rewards/margins = β (r_w - r_l), logps/chosen, logps/rejected; pair_accuracy = [log π(y_w|x) >
    log π(y_l|x)] (the policy alone prefers the chosen answer).
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        z = beta * (chosen_ratio - rejected_ratio)
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"loss_type={loss_type!r}: valid choices are sigmoid, ipo")
    chosen_rewards, rejected_rewards = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    return losses, {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                    "rewards/margins": chosen_rewards - rejected_rewards,
                    "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(),
                    "pair_accuracy": (chosen > rejected).detach().float()}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - e^x) for x < 0 without cancellation: log(-expm1(x)) near 0, log1p(-e^x) below -ln 2
    (Mächler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, chosen_tokens: torch.Tensor,
              rejected_tokens: torch.Tensor, orpo_lambda: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss of each pair (B,), trl's metrics of each pair) from the policy's log-probabilities
    of the chosen and rejected answers (B,) and their token counts (B,); no reference model.

    ORPO (Hong et al. 2024, Eqs. 2-7), with the mean log-probability per answer token
    ℓ_w = log π(y_w|x) / |y_w| (ℓ_l likewise) and log odds(y) = ℓ - log(1 - e^ℓ):
        L = -ℓ_w - λ log σ(log odds(y_w) - log odds(y_l))
    the chosen answer's NLL per token (the prompt carries no loss) plus the odds-ratio term. ℓ is
    capped at -1e-6 inside log(1 - e^ℓ): an answer the model is certain of (ℓ = 0 in float32) would
    give log 0. Metrics as trl's ORPO names them: rewards/* = λ ℓ, logps/* = ℓ, nll_loss,
    log_odds_ratio (log σ(...)), log_odds_chosen (the log odds difference), and pair_accuracy as dpo_loss's.
    """
    mean_chosen = chosen / chosen_tokens.clamp(min=1)
    mean_rejected = rejected / rejected_tokens.clamp(min=1)
    log_odds = (mean_chosen - mean_rejected) - (log1mexp(mean_chosen.clamp(max=-1e-6))
                                                - log1mexp(mean_rejected.clamp(max=-1e-6)))
    ratio = F.logsigmoid(log_odds)
    losses = -mean_chosen - orpo_lambda * ratio
    chosen_rewards, rejected_rewards = orpo_lambda * mean_chosen.detach(), orpo_lambda * mean_rejected.detach()
    return losses, {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                    "rewards/margins": chosen_rewards - rejected_rewards,
                    "logps/chosen": mean_chosen.detach(), "logps/rejected": mean_rejected.detach(),
                    "nll_loss": -mean_chosen.detach(), "log_odds_ratio": ratio.detach(),
                    "log_odds_chosen": log_odds.detach(), "pair_accuracy": (chosen > rejected).detach().float()}


class PreferenceLoss(nn.Module):
    """A preference objective's training loss: B pairs (2B rows, the chosen first) through the model
    in one forward, and, when the objective has a reference, through the same model with its
    adapters disabled, without gradients (before the policy's forward, so that its activations are
    gone when the policy's are kept). Returns Σ over the pairs of pair_loss; `sums` holds Σ over the
    pairs of each metric, detached, of the last forward. An nn.Module, for DDP / FSDP to wrap."""

    def __init__(self, model: nn.Module, objective: Preference):
        super().__init__()
        self.model = model
        self.objective = objective
        self.sums: dict[str, float] = {}

    def forward(self, input_ids, attention_mask, labels) -> torch.Tensor:
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum(1).chunk(2)       # answer tokens scored: (B,), (B,)
        reference = None
        if self.objective.reference:
            with torch.no_grad(), disable_adapters(self.model):
                reference = sequence_logps(self.model, input_ids, attention_mask, labels).chunk(2)
        policy = sequence_logps(self.model, input_ids, attention_mask, labels).chunk(2)
        losses, metrics = self.objective.pair_loss(policy, reference, tokens)
        self.sums = {k: float(v.sum()) for k, v in metrics.items()}
        return losses.sum()


@dataclass(frozen=True)
class Preference:
    """A preference objective over (prompt, chosen, rejected) pairs (preference_data): items are
    pairs, so the step's loss is the mean loss per pair. pair_loss(policy, reference, tokens) gives
    the loss and metrics of each pair from (chosen, rejected) log-probabilities and answer-token
    counts; reference: whether it needs the reference's log-probabilities (adapters disabled);
    plateau_progress: as Objective's."""

    name: str
    pair_loss: Callable
    reference: bool
    plateau_progress: float | None = PLATEAU_MIN_PROGRESS

    def micro_batches(self, dataset, step: int, config: RunConfig, ctx: distributed.Context,
                      pad_id: int) -> list[dict[str, torch.Tensor]]:
        return global_micro_batches(self.collate, dataset, step, config, ctx, pad_id)

    def collate(self, examples: list, pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(examples, pad_id)

    def loss(self, model: torch.nn.Module) -> torch.nn.Module:
        return PreferenceLoss(model, self)

    def items(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].shape[0] // 2

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    def metric_sums(self, loss_module: torch.nn.Module) -> dict[str, float]:
        return dict(loss_module.sums)

    def heldout_metrics(self, val_loss: float, means: dict[str, float]) -> dict[str, float]:
        return means

    def probe(self) -> dict[str, torch.Tensor]:
        one = torch.zeros(2, 2, dtype=torch.long)  # one pair, one predicted token each
        return {"input_ids": one, "attention_mask": torch.ones_like(one), "labels": one}

    def data_problems(self, train, validation) -> list[str]:
        return [f"{name}: objective={self.name} trains on preference records (prompt, chosen, rejected); these "
                f"{len(data.examples)} examples are of another format: give preference records (data.format="
                "preference) or set objective=sft" for name, data in (("data.train", train), ("validation", validation))
                if data is not None and not is_preference(data)]


def dpo(beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> Preference:
    """DPO (or IPO with loss_type="ipo"), the reference being the model with its adapters disabled (dpo_loss).

    Its loss curve gets no plateau verdict: it starts at ln 2 (sigmoid; IPO at 1 / (4β²)) whatever the
    task, and how far it can fall depends on β and on how separable the pairs are, not on how well
    the model learns; a run that lifts its pair accuracy well may move it by a tenth (0.69 -> 0.62 at
    β = 0.02). Progress is read off rewards/accuracies and pair_accuracy instead."""
    def pair_loss(policy, reference, tokens):
        return dpo_loss(*policy, *reference, beta, loss_type, label_smoothing, *tokens)

    return Preference("dpo", pair_loss, reference=True, plateau_progress=None)


def orpo(orpo_lambda: float = 0.1) -> Preference:
    """ORPO: the chosen answer's NLL plus the odds-ratio term, reference-free (orpo_loss). Its loss is
    mostly that cross-entropy, so its curve is judged by SFT's plateau rule."""
    def pair_loss(policy, reference, tokens):
        return orpo_loss(*policy, *tokens, orpo_lambda)

    return Preference("orpo", pair_loss, reference=False)


def objective_for(config: RunConfig) -> Objective:
    """The objective config.objective names, with config.preference's settings."""
    p = config.preference
    if config.objective == "dpo":
        return dpo(p.beta, p.loss, p.label_smoothing)
    if config.objective == "orpo":
        return orpo(p.orpo_lambda)
    return SFT()
