"""The retention monitor (eval.retention): KL(base || tuned) per token on general text, exactly 0
before training, rising as a tiny model overfits a narrow task, the same after a resume, and a
"forgetting" diagnostic above eval.retention_threshold."""

import json
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from test_training_loop import run_tiny

from lorakit import monitor
from lorakit.config import ConfigError, RunConfig
from lorakit.training import Hooks
from lorakit.training.evaluate import Retention, retention_kl


def evaluations(run_dir):
    return [(r["step"], r["retention_kl"]) for r in monitor.MetricsLog(Path(run_dir) / "metrics.jsonl").read()
            if r["type"] == "eval"]


def train_curve(run_dir):
    return [(r["step"], r["loss"]) for r in monitor.MetricsLog(Path(run_dir) / "metrics.jsonl").read()
            if r["type"] == "train"]


def test_retention_kl_is_zero_before_training_and_rises_as_the_task_is_overfit(tmp_path):
    summary = run_tiny(tmp_path / "on", ["eval.retention=true"])
    kls = evaluations(tmp_path / "on")
    assert [s for s, _ in kls] == [0, 4, 8, 12]
    assert kls[0][1] == 0.0 and summary["before"]["retention_kl"] == 0.0  # the same model, the same logits
    assert kls[1][1] > 0.1 and summary["after"]["retention_kl"] > 0.3  # measured: 0.342 at step 4, 0.428 after
    assert summary["after"]["retention_kl"] == kls[-1][1]
    # a 10x smaller learning rate moves the model (and the KL) far less
    low = run_tiny(tmp_path / "low", ["eval.retention=true", "train.lr=0.002"])
    assert low["after"]["retention_kl"] < summary["after"]["retention_kl"] / 2
    # forgetting is diagnosed at the first evaluation above the threshold (0.1 by default)
    forgetting = [d for d in summary["diagnostics"] if d["kind"] == "forgetting"]
    assert [d["step"] for d in forgetting] == [4]
    assert "the model is forgetting" in forgetting[0]["message"] and "r=4" in forgetting[0]["message"]
    assert (tmp_path / "on" / "retention.pt").is_file() and (tmp_path / "on" / "loss.png").is_file()


def test_retention_leaves_training_and_held_out_numbers_unchanged(tmp_path):
    on = run_tiny(tmp_path / "on", ["eval.retention=true", "eval.retention_threshold=100"])
    off = run_tiny(tmp_path / "off")
    assert train_curve(tmp_path / "on") == train_curve(tmp_path / "off")
    assert on["after"]["val_loss"] == off["after"]["val_loss"]
    assert on["diagnostics"] == off["diagnostics"] == []
    assert "retention_kl" not in off["after"] and not (tmp_path / "off" / "retention.pt").exists()


def test_retention_from_a_file_and_after_a_resume(tmp_path):
    texts = tmp_path / "general.jsonl"
    texts.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the cat sat on the mat", "one two three")))
    run_tiny(tmp_path / "full", [f"eval.retention={texts}"])
    reference = Retention.load(tmp_path / "full" / "retention.pt")
    # the file's text tokens are scored (char tokenizer: one token per character, the end of text included,
    # the first token of each text predicted by nothing)
    assert sum(r.shape[0] for r in reference.reference) == len("the cat sat on the mat") + len("one two three")

    def crash_at_second_checkpoint(step, path):
        if step == 8:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "cut", [f"eval.retention={texts}"], hooks=Hooks(after_checkpoint=crash_at_second_checkpoint))
    run_tiny(tmp_path / "cut", [f"eval.retention={texts}"], resume=True)
    assert evaluations(tmp_path / "cut") == evaluations(tmp_path / "full")


def test_retention_kl_against_a_hand_computed_value():
    tok = char_tokenizer()
    model = tiny_llama(vocab=len(tok))
    batch = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 6, 7]])}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, :2]
    base = torch.log_softmax(torch.zeros_like(logits), -1)  # a uniform base: KL = log V - H(tuned)
    tuned = torch.log_softmax(logits, -1)
    expected = float((base.exp() * (base - tuned)).sum(-1).mean())
    assert retention_kl(model, Retention([batch], [base])) == pytest.approx(expected, rel=1e-6)
    assert retention_kl(model, Retention([batch], [tuned])) == 0.0


def test_check_forgetting_numbers():
    assert monitor.check_forgetting([0, 4, 8], [0.0, 0.05, 0.09], 0.1, 1e-3, 8) is None
    found = monitor.check_forgetting([0, 4, 8, 12], [0.0, 0.05, 0.2, 0.15], 0.1, 1e-3, 8)
    assert (found.kind, found.step) == ("forgetting", 8)
    assert "to 0.2;" in found.message and "largest 0.2)" in found.message and "lower lr (0.001)" in found.message
    assert "smaller rank" not in monitor.check_forgetting([0, 4], [0.0, 0.5], 0.1, 1e-5, None).message


def test_retention_config_errors():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({}, ["data.train=x.jsonl", "eval.retention_threshold=0", "eval.retention=''",
                                 "eval.retention=3"]).validate()
    assert "eval.retention=3: expected" in str(e.value) and "eval.retention_threshold=0: must be > 0" in str(e.value)
