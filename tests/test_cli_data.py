"""`lorakit data CONFIG [--set ...] [--json]`: the run's data as train reads it, checked; exit 1 on errors."""

import json

import pytest
from conftest import char_tokenizer, tiny_llama

from lorakit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    tok = char_tokenizer()
    tok.save_pretrained(root)
    tiny_llama(vocab=len(tok)).config.save_pretrained(root)  # only the tokenizer is read: no weights
    return root


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp_path, model_dir, test_start=100):
    write_jsonl(tmp_path / "train.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(20)])
    write_jsonl(tmp_path / "test.jsonl", [{"question": f"Q{i}?", "answer": f"A{i}"} for i in range(test_start, test_start + 4)])
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: {model_dir}\ndata:\n  train: {tmp_path / 'train.jsonl'}\n"
                    f"  test: {tmp_path / 'test.jsonl'}\n  validation_fraction: 0\n"
                    "  columns: {prompt: question, completion: answer}\ntrain:\n  epochs: 3\n  batch_size: 4\n")
    return path


def test_clean_data_exits_0_with_examples_lengths_and_the_derived_settings(tmp_path, model_dir, capsys):
    assert main(["data", str(config(tmp_path, model_dir)), "--examples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- {tmp_path / 'train.jsonl'}:1 (3 label tokens)\nQ0?[A0<|im_end|>]\n"
                          f"--- {tmp_path / 'train.jsonl'}:2 (3 label tokens)\nQ1?[A1<|im_end|>]\n")
    assert "train             20      6       7      8      8         70         0\n" in out  # Q0?A0 6, Q10?A10 8
    assert "0 error(s), 0 warning(s)\n" in out
    # 20 examples / 4 = 5 batches an epoch, 3 epochs; "A100" is 4 tokens: 4 + 2
    assert out.endswith("the run: data.max_length=64, eval.max_new_tokens=6, train.steps=15 (on one process)\n")


def test_json_and_errors_exit_1(tmp_path, model_dir, capsys):
    path = config(tmp_path, model_dir, test_start=18)  # Q18, Q19 are training prompts too
    assert main(["data", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["errors"], report["warnings"]) == (1, 0)
    (finding,) = report["findings"]
    assert finding["check"] == "leakage" and finding["message"].startswith("2 of 4 test examples (50.0%)")
    assert report["splits"]["test"]["examples"] == 4 and report["auto_max_length"] == 8
    assert report["run"] == {"data.max_length": 64, "eval.max_new_tokens": 5, "train.steps": 15}
    assert main(["data", str(path), "--json", "--set", "data.max_leakage=1"]) == 0
    assert json.loads(capsys.readouterr().out)["findings"][0]["level"] == "warning"


def test_a_bad_config_or_file_exits_2_naming_it(tmp_path, model_dir, capsys):
    path = config(tmp_path, model_dir)
    assert main(["data", str(path), "--set", "data.max_length=longest"]) == 2
    assert "data.max_length='longest': a number of tokens, or 'auto'" in capsys.readouterr().err
    assert main(["data", str(path), "--set", f"data.train={tmp_path / 'missing.jsonl'}"]) == 2
    assert f"data.train: {tmp_path / 'missing.jsonl'}: no such data file" in capsys.readouterr().err


def test_preference_pairs_are_checked_their_sequences_shown(tmp_path, model_dir, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Q{i}?", "chosen": f"A{i}", "rejected": f"B{i}"} for i in range(8)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"Q{i}?", "chosen": f"A{i}", "rejected": "no"} for i in (6, 7, 20, 21)])
    path = tmp_path / "dpo.yaml"
    path.write_text(f"model:\n  path: {model_dir}\nobjective: dpo\ndata:\n  train: {tmp_path / 'pairs.jsonl'}\n"
                    f"  test: {tmp_path / 'test.jsonl'}\n  validation_fraction: 0\n")
    assert main(["data", str(path), "--examples", "1"]) == 1  # Q6?, Q7? are training prompts too
    out = capsys.readouterr().out
    assert out.startswith(f"--- {tmp_path / 'pairs.jsonl'}:1 chosen (3 label tokens)\nQ0?[A0<|im_end|>]\n"
                          f"--- {tmp_path / 'pairs.jsonl'}:1 rejected (3 label tokens)\nQ0?[B0<|im_end|>]\n")
    assert "train              8      6       6      6      6         48         0\n" in out  # 8 pairs, 16 sequences
    assert "error: [leakage] 2 of 4 test pairs (50.0%) also appear in the training data" in out
    assert "1 error(s), 0 warning(s)\n" in out
    assert main(["data", str(path), "--json", "--set", f"data.test={tmp_path / 'pairs.jsonl'}",
                 "--set", "data.max_leakage=1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["errors"], report["warnings"]) == (0, 1) and report["splits"]["train"]["sequences"] == 16
