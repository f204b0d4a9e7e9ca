"""DPO and ORPO through the training loop on a tiny seeded model: the curve starts at ln 2 with zero
rewards (the policy is its reference), trl's metrics reach metrics.jsonl and summary.json, pair accuracy
before and after; only the adapters train and the reference (adapters disabled) never moves; a
resumed run reproduces the uninterrupted curve; every bad preference setting is reported at once."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit import monitor
from lorakit.config import ConfigError, RunConfig
from lorakit.data import Record, build_dataset
from lorakit.inject import disable_adapters
from lorakit.preference_data import collate_pairs
from lorakit.training import Hooks, Prepared, train
from lorakit.training.objectives import sequence_logps
from lorakit.training.setup import prepare_model

METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "pair_accuracy"]


def reverse_pairs(n, seed=0):
    """prompt "<abcd>=", chosen the reversed word "dcba", rejected the same with its last letter wrong."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        word = "".join(chr(97 + int(c)) for c in torch.randint(0, 6, (4,), generator=g))
        chosen = word[::-1]
        rejected = chosen[:-1] + ("a" if chosen[-1] != "a" else "b")
        rows.append(Record({"prompt": f"<{word}>=", "chosen": chosen, "rejected": rejected}, f"pairs:{i}"))
    return rows


def tiny_preference_run(overrides=(), objective="dpo"):
    config = RunConfig.from_dict({}, [
        f"objective={objective}", "data.train=unused.jsonl", "train.steps=12", "train.batch_size=8",
        "train.lr=0.02", "train.warmup_steps=2", "train.log_every=1", "train.save_every=4", "eval.every=4",
        "eval.max_new_tokens=6", "lora.r=4", "lora.alpha=8", *overrides])
    tok = char_tokenizer()
    model = prepare_model(tiny_llama(vocab=len(tok), init_range=0.1), config)
    return config, Prepared(model, tok, build_dataset(reverse_pairs(64), tok), build_dataset(reverse_pairs(16, 1), tok),
                            build_dataset(reverse_pairs(8, 2), tok))


def run(run_dir, overrides=(), objective="dpo", prepared=None, **kwargs):
    config, made = tiny_preference_run(overrides, objective)
    return train(config, run_dir, prepared=prepared or made, progress=False, log=kwargs.pop("log", lambda *_: None),
                 **kwargs)


def records(run_dir, kind="train"):
    return [r for r in monitor.MetricsLog(Path(run_dir) / "metrics.jsonl").read() if r["type"] == kind]


def test_dpo_run_starts_at_ln2_logs_trls_metrics_and_lifts_pair_accuracy(tmp_path):
    lines = []
    summary = run(tmp_path, log=lines.append)
    train_lines = records(tmp_path)
    assert len(train_lines) == 12
    first = train_lines[0]
    # before any update the policy is its reference: every log-ratio is 0, the loss is -log σ(0) = ln 2
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert [first[k] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins")] == [0.0, 0.0, 0.0]
    assert first["rewards/accuracies"] == 0.0  # ties are not wins, as in trl
    assert all(set(METRICS) <= r.keys() for r in train_lines)
    assert train_lines[-1]["loss"] < 0.5 < train_lines[-1]["rewards/accuracies"]
    before, after = summary["before"], summary["after"]
    assert before["val_loss"] == pytest.approx(math.log(2), rel=1e-6) and before["rewards/margins"] == 0.0
    assert after["val_loss"] < before["val_loss"] - 0.1
    assert after["pair_accuracy"] > before["pair_accuracy"] and after["rewards/accuracies"] >= 0.75
    assert "val_ppl" not in after and "exact_match" in after  # generation from the pairs' prompts still runs
    assert [r["step"] for r in records(tmp_path, "eval")] == [0, 4, 8, 12]
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["after"]["pair_accuracy"] == after["pair_accuracy"]
    (table,) = [line for line in lines if line.split()[:2] == ["before", "after"]]  # the before/after table
    assert "held-out pair accuracy" in table and "held-out reward margin" in table
    assert f"{100 * after['pair_accuracy']:.1f}%" in table.splitlines()[2]
    # without a bar each step's line carries its reward accuracy and margin (metrics.jsonl's numbers)
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split(", lr ")[0] for line in steps] == [
        f"step {r['step']}/12: loss {r['loss']:.4f}, reward accuracy {r['rewards/accuracies']:.3f}, reward margin "
        f"{r['rewards/margins']:.3f}" for r in train_lines]


def test_only_the_adapters_train_and_the_reference_never_moves(tmp_path):
    config, prepared = tiny_preference_run(["train.steps=6", "eval.every=0", "eval.generate=false"])
    model = prepared.model
    batch = collate_pairs(prepared.validation.examples, prepared.tokenizer.pad_token_id)

    def reference():
        with torch.no_grad(), disable_adapters(model):
            return sequence_logps(model, **batch)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    start = reference()
    assert all(".lora_" in n for n in adapters) and len(frozen) > 0
    train(config, tmp_path, prepared=prepared, progress=False, log=lambda *_: None)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert all(not torch.equal(p, adapters[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert torch.equal(reference(), start)  # bit for bit: training moved nothing the reference reads
    with torch.no_grad():
        assert (sequence_logps(model, **batch) - start).abs().max() > 0.1  # while the policy did move


def test_resume_after_interruption_reproduces_the_dpo_curve(tmp_path):
    run(tmp_path / "full")
    saved = []

    def crash_after_second_checkpoint(step, path):
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", hooks=Hooks(after_checkpoint=crash_after_second_checkpoint))
    assert records(tmp_path / "cut")[-1]["step"] == 8
    summary = run(tmp_path / "cut", resume=True)

    def curve(run_dir):
        return [{k: r[k] for k in ["step", "loss", "grad_norm", *METRICS]} for r in records(run_dir)]

    assert curve(tmp_path / "cut") == curve(tmp_path / "full") and len(curve(tmp_path / "full")) == 12
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["after"] == {**full["after"], "eval_seconds": summary["after"]["eval_seconds"]}


def test_orpo_trains_without_a_reference_and_with_full_fine_tuning(tmp_path):
    summary = run(tmp_path / "lora", ["train.steps=8", "eval.every=0"], objective="orpo")
    lines = records(tmp_path / "lora")
    assert {"nll_loss", "log_odds_ratio", "log_odds_chosen", *METRICS} <= lines[0].keys()
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.9  # 4.887 -> 3.890 in 8 steps
    assert summary["after"]["pair_accuracy"] >= summary["before"]["pair_accuracy"]
    summary = run(tmp_path / "full", ["method=full", "train.steps=2", "train.lr=1e-4", "eval.every=0",
                                      "eval.generate=false"], objective="orpo")
    assert summary["steps"] == 2 and (tmp_path / "full" / "model").is_dir()


def test_the_objective_and_the_data_must_agree(tmp_path):
    config, prepared = tiny_preference_run(["train.steps=1"])
    sft_data = build_dataset([Record({"prompt": "<ab>=", "completion": "ba"}, f"m:{i}") for i in range(16)],
                             prepared.tokenizer)
    with pytest.raises(ConfigError, match="data.train: objective=dpo trains on preference records \\(prompt, "
                                          "chosen, rejected\\); these 16 examples are of another format"):
        train(config, tmp_path / "a", prepared=Prepared(prepared.model, prepared.tokenizer, sft_data, None, None),
              progress=False, log=lambda *_: None)
    sft = RunConfig.from_dict({}, ["data.train=unused.jsonl", "train.steps=1"])
    with pytest.raises(ConfigError) as e:
        train(sft, tmp_path / "b", prepared=prepared, progress=False, log=lambda *_: None)
    assert e.value.problems == [
        "data.train: holds preference records (prompt, chosen, rejected); they train with objective=dpo or "
        "objective=orpo, or give prompt/completion records for objective=sft",
        "validation: holds preference records (prompt, chosen, rejected); they train with objective=dpo or "
        "objective=orpo, or give prompt/completion records for objective=sft"]


def test_every_bad_preference_setting_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({"objective": "dpo", "method": "full",
                             "preference": {"beta": 0, "loss": "hinge", "label_smoothing": 0.5, "orpo_lambda": -1,
                                            "lambda": 0.1},
                             "data": {"packing": True, "padding_free": True, "format": "chat"}})
    assert e.value.problems == [
        "unknown key preference.lambda: valid keys in preference are beta, loss, label_smoothing, orpo_lambda",
        "preference.loss='hinge': valid choices are sigmoid, ipo",
        "preference.beta=0: must be > 0 (typical: 0.1; higher keeps the policy closer to the reference)",
        "preference.label_smoothing=0.5: must be in [0, 0.5) (the fraction of pairs assumed flipped; typical: 0 "
        "or 0.1)",
        "preference.orpo_lambda=-1: must be >= 0 (typical: 0.1)",
        "objective='dpo' with method='full': DPO needs a frozen reference model, and lorakit takes it from the same "
        "network with the adapters disabled (no second copy of the weights); full fine-tuning has no adapters to "
        "disable: use method=lora or method=qlora, or objective=orpo (reference-free)",
        "objective='dpo' with data.format='chat': a preference objective trains on (prompt, chosen, rejected) "
        "records: use data.format=preference or auto",
        "data.packing=true with objective='dpo': a preference pair is two whole sequences compared with each other, "
        "they cannot be packed: set data.packing=false",
        "data.padding_free=true with objective='dpo': preference pairs are collated padded (each sequence's "
        "log-probability is read from its own row): set data.padding_free=false"]


@pytest.mark.parametrize("settings,problem", [
    ({"objective": "ppo"}, "objective='ppo': valid choices are sft, dpo, orpo"),
    ({"objective": 1}, "objective=1: valid choices are sft, dpo, orpo"),
    ({"preference": {"beta": "high"}}, "preference.beta='high': expected float"),
    ({"preference": {"beta": -0.1}}, "preference.beta=-0.1: must be > 0"),
    ({"preference": {"loss": "ipo", "label_smoothing": 0.1}},
     "preference.label_smoothing=0.1 with preference.loss='ipo': label smoothing applies to loss 'sigmoid' only; "
     "set it to 0"),
    ({"preference": {"label_smoothing": -0.1}}, "preference.label_smoothing=-0.1: must be in [0, 0.5)"),
    ({"preference": {"orpo_lambda": None}}, "preference.orpo_lambda=None: expected float"),
    ({"objective": "dpo", "lora": {"init": "pissa"}},
     "objective='dpo' with lora.init='pissa': DPO's reference is the model with its adapters disabled, and this "
     "initialisation rewrites the base weight (W - scale·B₀A₀), so that is not the model training starts from: "
     "use lora.init=default or gaussian"),
    ({"objective": "dpo", "lora": {"bias": "all"}},
     "objective='dpo' with lora.bias='all': DPO's reference is the model with its adapters disabled, but trained "
     "biases change the base in place, so the reference would move with training: use lora.bias=none"),
    ({"data": {"format": "preference"}},
     "data.format='preference' with objective='sft': preference records train with objective=dpo or orpo"),
    ({"objective": "orpo", "data": {"format": "text"}},
     "objective='orpo' with data.format='text': a preference objective trains on (prompt, chosen, rejected) "
     "records: use data.format=preference or auto"),
])
def test_each_bad_preference_setting_names_the_rule(settings, problem):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict(settings)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_good_preference_settings_round_trip_through_yaml_keys():
    config = RunConfig.from_dict({}, ["objective=dpo", "preference.beta=0.5", "preference.loss=ipo",
                                      "preference.orpo_lambda=0.2"])
    assert config.to_dict()["objective"] == "dpo"
    assert config.to_dict()["preference"] == {"beta": 0.5, "loss": "ipo", "label_smoothing": 0.0, "orpo_lambda": 0.2}
    assert RunConfig.from_dict(config.to_dict()) == config
    assert RunConfig.from_dict({"method": "full", "objective": "orpo"}).problems() == []
    assert RunConfig().objective == "sft"


def test_a_dpo_run_that_learns_gets_no_plateau_verdict(tmp_path):
    # 30 steps at β = 0.02: the loss moves 0.69 -> ~0.62 and flattens while the pair accuracy climbs
    # 0.375 -> 0.875; SFT's plateau rule (tuned for cross-entropy) would call this a plateau
    summary = run(tmp_path, ["train.steps=30", "preference.beta=0.02", "eval.every=30", "train.save_every=30"])
    curve = records(tmp_path)
    steps, losses = [r["step"] for r in curve], [r["loss"] for r in curve]
    assert monitor.check_plateau(steps, losses, r=4, lr=0.02) is not None  # SFT's rule on this curve
    assert monitor.check_curve(curve, 0.02, 4) is not None
    assert summary["diagnostics"] == []
    assert summary["after"]["pair_accuracy"] - summary["before"]["pair_accuracy"] >= 0.25
    assert curve[-1]["rewards/accuracies"] >= 0.75


def test_objectives_say_how_their_curve_is_judged():
    from lorakit.training.objectives import SFT, dpo, orpo

    assert SFT().plateau_progress == monitor.PLATEAU_MIN_PROGRESS == orpo().plateau_progress
    assert dpo().plateau_progress is None and dpo(loss_type="ipo").plateau_progress is None


# --- the policy's log-probabilities in chunks (loss.chunked_token_logps): no (n, V) logits kept ---

def full_token_logps(hidden, weight, targets, bias=None):
    """The definition: log softmax of the full float32 logits at the targets, through autograd."""
    return torch.nn.functional.linear(hidden, weight, bias).float().log_softmax(-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 256])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_logps_equal_the_full_logits_and_so_do_their_gradients(chunk_size, with_bias):
    from lorakit.loss import chunked_token_logps

    g = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(13, 8, generator=g, requires_grad=True)
    weight, bias = torch.randn(40, 8, generator=g), torch.randn(40, generator=g) if with_bias else None
    targets, upstream = torch.randint(0, 40, (13,), generator=g), torch.randn(13, generator=g)
    ours = chunked_token_logps(hidden, weight, targets, bias, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad((ours * upstream).sum(), hidden)
    expected = full_token_logps(hidden, weight, targets, bias)
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)
    assert ours.dtype == torch.float32 and torch.allclose(ours, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the reference's forward: values only
        assert torch.allclose(chunked_token_logps(hidden, weight, targets, bias, chunk_size), expected, atol=1e-6)


def test_chunked_token_logps_of_a_trained_head_give_its_gradient_too():
    from lorakit.loss import chunked_token_logps

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 4, generator=g, requires_grad=True), torch.randn(9, 4, generator=g, requires_grad=True)
    targets = torch.randint(0, 9, (5,), generator=g)
    ours = torch.autograd.grad(chunked_token_logps(hidden, weight, targets, chunk_size=2).sum(), (hidden, weight))
    expected = torch.autograd.grad(full_token_logps(hidden, weight, targets).sum(), (hidden, weight))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(ours, expected))
    with pytest.raises(ValueError, match="chunk_size=0 must be a positive int"):
        chunked_token_logps(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"needs hidden \(N, d\), weight \(V, d\), targets \(N,\); got hidden \(5, 4\), "
                                         r"weight \(9, 4\), targets \(4,\)"):
        chunked_token_logps(hidden, weight, targets[:4])


def test_the_dpo_gradient_equals_the_one_through_the_full_logits():
    """The adapters' gradients of a DPO step (policy log-probabilities in chunks) equal those of the
    same loss computed from the model's full logits, the reference held fixed."""
    from lorakit.training.objectives import dpo, dpo_loss

    config, prepared = tiny_preference_run(["lora.init=random"])
    model, batch = prepared.model, collate_pairs(prepared.train.examples[:6], prepared.tokenizer.pad_token_id)
    with torch.no_grad(), disable_adapters(model):
        ref = sequence_logps(model, **batch).chunk(2)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(dpo().loss(model)(**batch), params)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    token = logits.log_softmax(-1).gather(2, targets.clamp(min=0)[..., None])[..., 0] * keep  # (2B, T-1)
    losses, _ = dpo_loss(*token.sum(1).chunk(2), *ref)
    expected = torch.autograd.grad(losses.sum(), params)
    assert max(float((a - b).abs().max()) for a, b in zip(ours, expected)) < 1e-6
    assert max(float(b.abs().max()) for b in expected) > 1e-3  # a gradient that is not 0
