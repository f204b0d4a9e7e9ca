"""Every subcommand but train (tests/test_cli_train_errors.py), fed the kinds of bad input users hand it (missing paths, files where
directories belong, empty or broken files, bad numbers): each must end in a `lorakit <cmd>: error:`
message and a non-zero exit, never a traceback. Most cases run in-process (main() as the console
script calls it); a few in processes of their own (tests/processes.py)."""

import json

import pytest
from conftest import char_tokenizer, tiny_llama
from test_cli_errors import copy_model, corrupt, make_adapter

from lorakit.cli import COMMANDS, main


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    tok = char_tokenizer()
    tiny_llama(hidden=64, vocab=len(tok), init_range=0.1).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    make_adapter(root / "model", root / "adapter")
    (root / "empty_dir").mkdir()
    (root / "empty.txt").write_text("")
    (root / "blank.jsonl").write_text("  \n\n")
    (root / "broken.json").write_text('{"model_type": "llama", ')
    (root / "list.json").write_text("[1, 2]")
    (root / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    (root / "heads0").mkdir()
    (root / "heads0" / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 0, "vocab_size": 96}))
    corrupt(copy_model(root / "adapter", root / "broken_adapter"), "truncated")
    broken_model = copy_model(root / "model", root / "broken_model")
    (broken_model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    bad_config = copy_model(root / "model", root / "bad_config_model")
    (bad_config / "config.json").write_text("{")
    return {k.replace(".", "_"): str(root / k) for k in ("model", "adapter", "empty_dir", "empty.txt", "blank.jsonl", "broken.json",
                                       "list.json", "binary.jsonl", "heads0", "broken_adapter", "broken_model",
                                       "bad_config_model")} | {"missing": str(root / "missing")}


CASES = {
    "plan": [
        ["--model", "{missing}"], ["--model", "{empty_txt}"], ["--model", "{broken_json}"], ["--model", "{list_json}"],
        ["--model", "{empty_dir}"], ["--model", "{heads0}"], ["--model", "llama-2-7b", "--gpu-gb", "-5"],
        ["--model", "llama-2-7b", "--gpu-gb", "0"], ["--model", "llama-2-7b", "--gpu-gb", "nan"],
        ["--model", "llama-2-7b", "--gpu-gb", "abc"], ["--model", "llama-2-7b", "--rank", "0"],
        ["--model", "llama-2-7b", "--rank", "1e3"], ["--model", "llama-2-7b", "--seq", "99999999999999"],
        ["--model", "llama-2-7b", "--batch", "-1"], ["--model", "llama-2-7b", "--gpus", "0"],
        ["--model", "llama-2-7b", "--targets", "((.)*)*!"],
    ],
    "data": [
        ["{missing}"], ["{empty_dir}"], ["{binary_jsonl}"], ["{list_json}"],
        ["--set", "model.path={model}", "--set", "data.train={missing}"],
        ["--set", "model.path={model}", "--set", "data.train={empty_txt}"],
        ["--set", "model.path={model}", "--set", "data.train={blank_jsonl}"],
        ["--set", "model.path={model}", "--set", "data.train={binary_jsonl}"],
        ["--set", "model.path={model}", "--set", "data.train={broken_json}"],
        ["--set", "model.path={missing}"], ["--set", "model.path={empty_dir}"],
        ["--set", "data.max_length=nan"], ["--set", "data.columns=[1]"], ["--set", "train.epochs=-1"],
    ],
    "probe": [
        ["{missing}"], ["{empty_dir}"], ["{binary_jsonl}"], ["{list_json}"],
        ["--set", "model.path={missing}"], ["--set", "model.path={empty_dir}"],
        ["--set", "model.path={broken_model}", "--set", "data.train=builtin:stardate"],
        ["--set", "model.path={model}", "--set", "data.train={missing}"],
        ["--set", "model.path={model}", "--set", "data.train={blank_jsonl}"],
        ["--set", "method=full"], ["--set", "objective=orpo"], ["--set", "lora.r=0"],
        ["--steps", "0"], ["--steps", "1"], ["--steps", "x"], ["--full-lr", "-1"], ["--full-lr", "nan"],
        ["--set", "model.path={model}", "--out", "{empty_txt}"],
    ],
    "inspect": [["{missing}"], ["{empty_txt}"], ["{empty_dir}"], ["{broken_adapter}"], ["{model}"]],
    "merge": [
        ["--adapter", "{missing}", "--out", "{missing}"], ["--adapter", "{empty_txt}", "--out", "{missing}"],
        ["--adapter", "{adapter}", "--out", "{empty_dir}"], ["--adapter", "{broken_adapter}", "--out", "{missing}"],
        ["--adapter", "{adapter}", "--model", "{broken_model}", "--out", "{missing}"],
        ["--adapter", "{adapter}", "--model", "{empty_txt}", "--out", "{missing}"],
    ],
    "generate": [
        ["--model", "{missing}", "hi"], ["--model", "{empty_txt}", "hi"], ["--model", "{empty_dir}", "hi"],
        ["--model", "{bad_config_model}", "hi"], ["--model", "{broken_model}", "hi"],
        ["--model", "{model}", "--adapter", "{broken_adapter}", "hi"],
        ["--model", "{model}", "--adapter", "{empty_dir}", "hi"], ["--model", "{model}", "--temperature", "-1", "hi"],
        ["--model", "{model}", "--temperature", "inf", "hi"], ["--model", "{model}", "--max-new-tokens", "-3", "hi"],
        ["--model", "{model}", "--dtype", "int8", "hi"],
    ],
    "chat": [["--model", "{missing}"], ["--model", "{broken_model}"], ["--model", "{model}", "--temperature", "x"]],
    "eval": [
        ["--model", "{model}", "--data", "{missing}"], ["--model", "{model}", "--data", "{empty_txt}"],
        ["--model", "{model}", "--data", "{blank_jsonl}"], ["--model", "{model}", "--data", "{empty_dir}"],
        ["--model", "{model}", "--data", "{broken_json}"], ["--model", "{model}", "--data", "{binary_jsonl}"],
        ["--model", "{model}", "--data", "builtin:nope"], ["--model", "{model}", "--data", "x.jsonl", "--batch-size", "0"],
        ["--model", "{model}", "--data", "x.jsonl", "--max-length", "nan"],
        ["--model", "{broken_model}", "--data", "builtin:stardate"],
    ],
    "quantize": [
        ["{missing}", "--out", "{missing}"], ["{empty_txt}", "--out", "{missing}"],
        ["{empty_dir}", "--out", "{missing}"], ["{broken_model}", "--out", "{missing}"],
        ["{bad_config_model}", "--out", "{missing}"], ["{model}", "--out", "{empty_dir}"],
        ["{model}", "--out", "{missing}", "--compute-dtype", "int4"],
    ],
    "export": [
        ["{missing}", "--out", "{missing}"], ["{empty_txt}", "--out", "{missing}"],
        ["{empty_dir}", "--out", "{missing}"], ["{broken_adapter}", "--base", "{model}", "--out", "{missing}"],
        ["{broken_model}", "--out", "{missing}"], ["{bad_config_model}", "--out", "{missing}"],
        ["{model}", "--out", "{empty_txt}"], ["{model}", "--out", "{missing}/sub/x.gguf"],
        ["{adapter}", "--base", "{missing}", "--out", "{missing}"],
        ["{model}", "--out", "{missing}", "--quant", "q2_k"],
    ],
}


def test_every_subcommand_but_train_is_fuzzed():
    # train is fuzzed with its own configs and data files (tests/test_cli_train_errors.py)
    assert set(COMMANDS) - {"train"} == set(CASES)


@pytest.mark.parametrize("command, args", [(c, a) for c, cases in CASES.items() for a in cases],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_input_is_an_error_message_not_a_traceback(paths, capsys, command, args):
    argv = [command] + [a.format(**paths) for a in args]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"lorakit {command}: error: " in err
    assert "Traceback" not in err


def test_bad_input_in_real_processes(forkserver, paths):
    """The console entry point as a user runs it: the same contract, through sys.exit."""
    for argv in (["inspect", paths["broken_adapter"]], ["plan", "--model", paths["heads0"]],
                 ["generate", "--model", paths["broken_model"], "hi"]):
        result = forkserver.run(*argv)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"lorakit {argv[0]}: error: ")
        assert "Traceback" not in result.stdout + result.stderr
