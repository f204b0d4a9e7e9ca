"""The preference objectives' numbers against trl 1.16 (the test-only reference, as peft is for the
layers): DPO (sigmoid, IPO, label smoothing) and ORPO losses and metrics on the same model, batch and
reference log-probabilities, to 1e-5; the reference with adapters disabled equals an untouched copy
of the base; the objectives' seam (items, metric sums, probe, held-out metrics)."""

import copy
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit.config import RunConfig
from lorakit.data import Record, build_dataset
from lorakit.inject import disable_adapters
from lorakit.preference_data import collate_pairs
from lorakit.training.objectives import (SFT, dpo, dpo_loss, objective_for, orpo, orpo_loss, sequence_logps)
from lorakit.training.setup import prepare_model

TOL = dict(rel=1e-5, abs=1e-6)
tok = char_tokenizer()

PAIRS = [("<abcd>=", "dcba", "abcd"), ("<bbca>=", "acbb", "acb"), ("<fa>=", "af", "fa"),
         ("<ceed>=", "deec", "deed")]


def pairs_batch(rows=PAIRS):
    records = [Record({"prompt": p, "chosen": c, "rejected": r}, f"m:{i}") for i, (p, c, r) in enumerate(rows)]
    return collate_pairs(build_dataset(records, tok).examples, tok.pad_token_id)


def adapted_model(seed=0):
    """(a tiny llama with LoRA adapters that change its output (init random), an untouched copy of its base)."""
    base = tiny_llama(vocab=len(tok), init_range=0.1, seed=seed)
    untouched = copy.deepcopy(base)
    config = RunConfig.from_dict({}, ["lora.r=4", "lora.alpha=8", "lora.init=random"])
    torch.manual_seed(seed)
    return prepare_model(base, config), untouched


def trl_dpo(model, batch, ref_chosen, ref_rejected, loss_type, beta=0.1, label_smoothing=0.0):
    """trl's DPOTrainer._compute_loss on `model` (a copy, with trl's fused LM head) and `batch`, the
    reference log-probabilities given as precomputed: (loss, trl's metrics)."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    model = copy.deepcopy(model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t,
                                  unwrap_model=lambda m: m)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long(),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    (metrics,) = trainer._metrics.values()  # under "eval": the model is in eval mode (no dropout either way)
    return loss.item(), {k: v[-1] for k, v in metrics.items()}


def ours(objective, model, batch):
    """(mean loss per pair, mean metrics) of a lorakit objective on one batch, as the loop computes them."""
    loss_module = objective.loss(model)
    total = loss_module(**batch)
    items = objective.items(batch)
    return total.item() / items, {k: v / items for k, v in objective.metric_sums(loss_module).items()}


def reference_logps(model, batch):
    with torch.no_grad(), disable_adapters(model):
        return sequence_logps(model, **batch).chunk(2)


TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")


@pytest.mark.parametrize("loss_type,beta", [("sigmoid", 0.1), ("sigmoid", 0.5), ("ipo", 0.1), ("ipo", 2.0)])
def test_dpo_loss_and_metrics_equal_trl(loss_type, beta):
    model, _ = adapted_model()
    batch = pairs_batch()
    ref_chosen, ref_rejected = reference_logps(model, batch)
    loss, metrics = ours(dpo(beta, loss_type), model, batch)
    trl_loss, trl_metrics = trl_dpo(model, batch, ref_chosen, ref_rejected, loss_type, beta)
    assert loss == pytest.approx(trl_loss, **TOL)
    for name in TRL_METRICS:
        assert metrics[name] == pytest.approx(trl_metrics[name], **TOL), name
    # the adapters move the policy away from the reference: the rewards are not all 0
    assert abs(metrics["rewards/margins"]) > 1e-3 and loss != pytest.approx(math.log(2), abs=1e-4)


def test_dpo_label_smoothing_equals_conservative_dpo_as_trl_computes_it():
    """trl 1.16's sigmoid loss has no label smoothing; its 'aot' loss is conservative DPO over the batch
    sorted, which for one pair is exactly -(1 - ε) log σ(βΔ) - ε log σ(-βΔ)."""
    model, _ = adapted_model()
    for row in PAIRS:
        batch = pairs_batch([row])
        ref_chosen, ref_rejected = reference_logps(model, batch)
        loss, _ = ours(dpo(0.3, "sigmoid", 0.2), model, batch)
        assert loss == pytest.approx(trl_dpo(model, batch, ref_chosen, ref_rejected, "aot", 0.3, 0.2)[0], **TOL)


def test_sequence_logps_equal_trls_batch_logps_and_the_reference_equals_an_untouched_base():
    from trl.experimental.orpo import ORPOTrainer

    model, untouched = adapted_model()
    batch = pairs_batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = ORPOTrainer.get_batch_logps(logits, batch["labels"], average_log_prob=False)
    assert torch.allclose(sequence_logps(model, **batch), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        base = sequence_logps(untouched, **batch)
        adapted = sequence_logps(model, **batch)
    assert torch.equal(torch.cat(reference_logps(model, batch)), base)  # adapters disabled == the base, bit for bit
    assert (adapted - base).abs().max() > 1e-2  # and the adapters do change the model


def trl_orpo(model, batch, orpo_lambda):
    """trl's ORPO loss and metrics from its own functions (odds_ratio_loss, get_batch_logps with
    average_log_prob), the chosen NLL over the answer tokens: trl's ORPOTrainer takes the NLL over
    prompt and answer (its concatenated_forward), where lorakit's prompt tokens carry no loss."""
    from trl.experimental.orpo import ORPOTrainer

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    mean_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    chosen, rejected = mean_logps.chunk(2)
    trainer = SimpleNamespace(beta=orpo_lambda, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        trainer, chosen, rejected)
    b = len(chosen)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits[i, :-1], labels[i, 1:]) for i in range(b)])
    metrics = {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
               "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
               "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
               "logps/chosen": chosen.mean(), "logps/rejected": rejected.mean(), "nll_loss": nll.mean(),
               "log_odds_ratio": log_odds_ratio, "log_odds_chosen": log_odds_chosen}
    return (nll.mean() - losses.mean()).item(), {k: v.item() for k, v in metrics.items()}


@pytest.mark.parametrize("orpo_lambda", [0.1, 1.0])
def test_orpo_loss_and_metrics_equal_trl(orpo_lambda):
    model, _ = adapted_model(seed=3)
    batch = pairs_batch()
    loss, metrics = ours(orpo(orpo_lambda), model, batch)
    trl_loss, trl_metrics = trl_orpo(model, batch, orpo_lambda)
    assert loss == pytest.approx(trl_loss, **TOL)
    for name, value in trl_metrics.items():
        assert metrics[name] == pytest.approx(value, **TOL), name


def test_dpo_loss_by_hand():
    """Δ = (-1 - -2) - (-3 - -2.5) = 1.5: sigmoid -log σ(0.1 · 1.5); IPO with 2 and 4 answer tokens
    (1/2 - -0.5/4 - 1/(2·0.1))²; rewards β r."""
    t = torch.tensor
    losses, m = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]), beta=0.1)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.15))), rel=1e-6)
    assert (m["rewards/chosen"].item(), m["rewards/rejected"].item()) == pytest.approx((0.1, -0.05))
    assert (m["rewards/accuracies"].item(), m["rewards/margins"].item()) == pytest.approx((1.0, 0.15))
    assert m["pair_accuracy"].item() == 1.0
    losses, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]), 0.1, "ipo", 0.0, t([2]), t([4]))
    assert losses.item() == pytest.approx((0.5 + 0.125 - 5) ** 2, rel=1e-6)
    losses, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.5]), 0.1, "sigmoid", 0.25)
    sig = 1 / (1 + math.exp(-0.15))
    assert losses.item() == pytest.approx(-0.75 * math.log(sig) - 0.25 * math.log(1 - sig), rel=1e-6)


def test_orpo_loss_by_hand():
    """ℓ_w = -2/4, ℓ_l = -3/2: L = 0.5 - λ log σ((ℓ_w - ℓ_l) - (log(1 - e^ℓ_w) - log(1 - e^ℓ_l)))."""
    t = torch.tensor
    losses, m = orpo_loss(t([-2.0]), t([-3.0]), t([4]), t([2]), 0.2)
    log_odds = (-0.5 + 1.5) - (math.log(1 - math.exp(-0.5)) - math.log(1 - math.exp(-1.5)))
    assert losses.item() == pytest.approx(0.5 - 0.2 * math.log(1 / (1 + math.exp(-log_odds))), rel=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(log_odds, rel=1e-6)
    assert m["pair_accuracy"].item() == 1.0 and m["rewards/accuracies"].item() == 1.0  # -2 > -3 and -0.5 > -1.5


def test_the_objective_follows_the_config():
    assert objective_for(RunConfig()) == SFT()
    d = objective_for(RunConfig.from_dict({"objective": "dpo", "preference": {"beta": 0.3, "loss": "ipo"}}))
    o = objective_for(RunConfig.from_dict({"objective": "orpo", "preference": {"orpo_lambda": 0.5}}))
    assert (d.name, d.reference, o.name, o.reference) == ("dpo", True, "orpo", False)
    t = torch.tensor
    # the settings reach the pair loss: IPO with beta 0.3 on zero log-ratios gives (1/(2·0.3))²
    losses, _ = d.pair_loss((t([-1.0]), t([-2.0])), (t([-1.0]), t([-2.0])), (t([1]), t([1])))
    assert losses.item() == pytest.approx((1 / 0.6) ** 2, rel=1e-6)
    losses, _ = o.pair_loss((t([-1.0]), t([-1.0])), None, (t([1]), t([1])))
    assert losses.item() == pytest.approx(1 - 0.5 * math.log(0.5), rel=1e-6)


def test_seam_items_tokens_probe():
    batch = pairs_batch()
    objective = dpo()
    assert objective.items(batch) == 4 and objective.tokens(batch) == int(batch["attention_mask"].sum())
    model, _ = adapted_model()
    with torch.no_grad():  # the probe is a batch the loss module takes: FSDP's first forward
        assert torch.isfinite(objective.loss(model)(**objective.probe()))
        assert torch.isfinite(SFT().loss(model)(**SFT().probe()))
    assert SFT().metric_sums(SFT().loss(model)) == {}
    assert SFT().heldout_metrics(1.0, {}) == {"val_ppl": pytest.approx(math.e)}
