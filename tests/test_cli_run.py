"""The run-level commands on a tiny model directory: merge, eval, generate, train errors."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from test_inject import randomize_adapters

from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import main
from lorakit.models import load_model


@pytest.fixture
def base_dir(tmp_path):
    tok = char_tokenizer()
    tiny_llama(hidden=64, vocab=len(tok), init_range=0.1).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def adapter_for(base_dir, out, quantize=None):
    model, _ = load_model(base_dir, quantize=quantize)
    add_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", base_model=str(base_dir)))
    randomize_adapters(model)
    save_adapter(model, out)
    return model


PROBE = torch.tensor([[5, 17, 40, 41, 9, 60, 3]])


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_writes_a_model_equal_to_base_plus_adapter(tmp_path, base_dir, capsys, quantize):
    adapted = adapter_for(base_dir, tmp_path / "adapter", quantize)
    args = ["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")]
    assert main(args + (["--quantize", "nf4"] if quantize else [])) == 0
    assert "max |logit difference| on a probe sentence" in capsys.readouterr().out
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(PROBE).logits, adapted(PROBE).logits, rtol=1e-5, atol=1e-5)
    assert main(args) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def test_eval_reports_loss_and_exact_match(tmp_path, base_dir, capsys):
    rows = [{"prompt": "<ab>=", "completion": "ba"}, {"prompt": "<cd>=", "completion": "dc"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--model", str(base_dir), "--data", str(data), "--max-new-tokens", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    from lorakit.data import build_dataset, read_records
    from lorakit.training.evaluate import heldout_loss

    model, tok = load_model(base_dir)
    expected = heldout_loss(model, build_dataset(read_records(data), tok), tok.pad_token_id, 8)
    assert report["records"] == 2 and report["scored"] == 2
    assert report["loss"] == pytest.approx(expected, rel=1e-6)
    assert report["exact_match"] == 0.0  # a random tiny model does not reverse strings


def test_generate_is_greedy_decoding(tmp_path, base_dir, capsys):
    assert main(["generate", "--model", str(base_dir), "--raw", "--max-new-tokens", "5", "hello"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    model, tok = load_model(base_dir)
    ids = tok("hello", return_tensors="pt")["input_ids"]
    for _ in range(5):  # greedy, by hand
        with torch.no_grad():
            nxt = model(ids).logits[0, -1].argmax()
        if nxt.item() == tok.eos_token_id:
            break
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    assert text == tok.decode(ids[0, 5:], skip_special_tokens=True)


def test_train_refuses_to_overwrite_a_run_and_checks_resume(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("method: lora\n")
    assert main(["train", "--out", str(tmp_path / "run")]) == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "lora.r=4"]) == 2
    assert "drop CONFIG, --set and --out" in capsys.readouterr().err


def test_adapter_argument_must_be_an_adapter_or_run_directory(tmp_path, capsys):
    assert main(["generate", "--adapter", str(tmp_path), "hello"]) == 2
    assert "neither an adapter directory (adapter_config.json) nor a lorakit run directory" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_chat_keeps_the_conversation_and_ends_on_an_empty_line(base_dir, capsys, monkeypatch):
    import io

    seen = []
    import lorakit.cli.generate as g

    real = g._reply

    def recording_reply(model, tokenizer, prompt, args):
        seen.append(prompt)
        return real(model, tokenizer, prompt, args)

    monkeypatch.setattr(g, "_reply", recording_reply)
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nok\n\nnot read\n"))
    assert main(["chat", "--model", str(base_dir), "--max-new-tokens", "2"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(seen) == 2 and len(replies) == 2
    # the second prompt holds the first exchange, rendered by the chat template
    assert seen[1].startswith(f"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n{replies[0]}<|im_end|>\n")
    assert seen[1].endswith("<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n")
