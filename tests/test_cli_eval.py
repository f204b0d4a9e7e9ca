"""`lorakit eval` on preference data (prompt, chosen, rejected): held-out pair accuracy and mean
log-probabilities, exact on a model whose logits are hand-set to 0 (every token has probability 1/V)
and equal to a plain full forward on a random model."""

import json
import math

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit.cli import main
from lorakit.training.evaluate import pair_scores
from lorakit.data import build_dataset, read_records

# answers are scored with the eos token appended: "ba" is 3 tokens, "bab" 4
PAIRS = [{"prompt": "<ab>=", "chosen": "ba", "rejected": "bab"},     # 3 vs 4 tokens: the chosen wins
         {"prompt": "<cd>=", "chosen": "dcdc", "rejected": "dc"},    # 5 vs 3: the rejected wins
         {"prompt": "<ef>=", "chosen": "fe", "rejected": "ef"}]      # 3 vs 3: a tie is no win


def write_pairs(path, rows=PAIRS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def uniform_dir(tmp_path):
    """A tiny model whose final norm is 0: the hidden state entering the head is 0, so every logit is 0."""
    tok = char_tokenizer()
    model = tiny_llama(hidden=64, vocab=len(tok), init_range=0.1)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(tmp_path / "uniform")
    tok.save_pretrained(tmp_path / "uniform")
    return tmp_path / "uniform"


def test_eval_on_pairs_reports_pair_accuracy_and_mean_logps(tmp_path, uniform_dir, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl")
    assert main(["eval", "--model", str(uniform_dir), "--data", str(data), "--max-new-tokens", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    log_v = math.log(len(char_tokenizer()))             # log p = -log V per answer token
    assert report["records"] == 3 and report["pairs"] == 3
    assert report["pair_accuracy"] == pytest.approx(1 / 3)
    assert report["logps/chosen"] == pytest.approx(-(3 + 5 + 3) / 3 * log_v, rel=1e-6)
    assert report["logps/rejected"] == pytest.approx(-(4 + 3 + 3) / 3 * log_v, rel=1e-6)
    assert "loss" not in report and report["scored"] == 3  # no SFT loss; exact match against the chosen answers
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in PAIRS]
    assert main(["eval", "--model", str(uniform_dir), "--data", str(write_pairs(tmp_path / "s.jsonl", swapped)),
                 "--batch-size", "2", "--limit", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 2 and report["pair_accuracy"] == 0.5  # the first two, swapped: 4 vs 3, 3 vs 5


def test_pair_scores_equal_a_full_forward_of_each_sequence(tmp_path):
    tok = char_tokenizer()
    model = tiny_llama(hidden=64, vocab=len(tok), init_range=0.1).eval()
    data = build_dataset(read_records(write_pairs(tmp_path / "pairs.jsonl")), tok)
    chosen, rejected = [], []
    with torch.no_grad():
        for pair in data.examples:
            for ids, labels, out in ((pair.chosen_ids, pair.chosen_labels, chosen),
                                     (pair.rejected_ids, pair.rejected_labels, rejected)):
                logp = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)   # (T-1, V)
                out.append(sum(float(logp[t, y]) for t, y in enumerate(labels[1:]) if y != -100))
    scores = pair_scores(model, data, tok.pad_token_id, batch_size=2)
    assert scores["pairs"] == 3
    assert scores["pair_accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert scores["logps/chosen"] == pytest.approx(sum(chosen) / 3, rel=1e-5)
    assert scores["logps/rejected"] == pytest.approx(sum(rejected) / 3, rel=1e-5)


def test_a_malformed_pair_is_an_error_naming_its_line(tmp_path, uniform_dir, capsys):
    data = write_pairs(tmp_path / "bad.jsonl", PAIRS[:1] + [{"prompt": "<ab>=", "chosen": "ba", "rejected": "ba"}])
    assert main(["eval", "--model", str(uniform_dir), "--data", str(data)]) != 0
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and "chosen and rejected are the same answer" in err
