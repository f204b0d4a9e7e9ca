"""Bad inputs to the commands other than `train` (issue 11, section 3): each is refused with a
`lorakit <cmd>: error:` message that names the file or value, never a traceback or a silent result."""

import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import main


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "model"
    tok = char_tokenizer()
    tiny_llama(hidden=64, vocab=len(tok), init_range=0.1).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def copy_model(base_dir: Path, to: Path) -> Path:
    to.mkdir(parents=True)
    for f in base_dir.iterdir():
        (to / f.name).write_bytes(f.read_bytes())
    return to


def make_adapter(base_dir: Path, out: Path, r: int = 4, targets=("q_proj", "v_proj")) -> Path:
    model = tiny_llama(hidden=64, vocab=len(char_tokenizer()), init_range=0.1)
    add_lora(model, LoraConfig(r=r, alpha=8, targets=list(targets), init="random", base_model=str(base_dir)))
    save_adapter(model, out)
    return out


# --- 1. code in a model directory never runs ----------------------------------------------------

MARKER_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class CustomConfig(LlamaConfig):
    model_type = "lorakit_custom"
class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
class CustomTokenizer(PreTrainedTokenizerFast):
    pass
"""


def custom_code_model(base_dir: Path, where: Path, in_file: str) -> tuple[Path, Path]:
    """A copy of the tiny model whose config.json or tokenizer_config.json names code in
    custom.py (auto_map), which writes a marker file when imported."""
    model = copy_model(base_dir, where / "model")
    marker = where / "MARKER"
    (model / "custom.py").write_text(MARKER_CODE.format(marker=str(marker)))
    config = json.loads((model / in_file).read_text())
    if in_file == "config.json":
        config.update(model_type="lorakit_custom",
                      auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    else:
        config.update(tokenizer_class="CustomTokenizer", auto_map={"AutoTokenizer": [None, "custom.CustomTokenizer"]})
    (model / in_file).write_text(json.dumps(config))
    return model, marker


@pytest.mark.parametrize("in_file", ["config.json", "tokenizer_config.json"])
def test_custom_code_in_a_model_directory_never_runs(forkserver, tmp_path, base_dir, in_file):
    """In processes of their own (what a user meets, including transformers' prompt on stdin)."""
    model, marker = custom_code_model(base_dir, tmp_path, in_file)
    for command in (["generate", "--model", model, "--raw", "hi", "--max-new-tokens", "2"], ["chat", "--model", model]):
        result = forkserver.run(*command, stdin="y\ny\nhello\n")
        assert not marker.exists(), f"lorakit {command[0]} ran the model directory's code"
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert f"lorakit {command[0]}: error: {model / in_file}: custom-code models are not supported" in result.stderr
        assert "custom.py" in result.stderr


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_every_transformers_load_says_trust_remote_code_false(base_dir, monkeypatch, quantize):
    """Besides the auto_map check, each config, tokenizer and model load tells transformers never to
    run a model's code (it would otherwise ask on stdin, and run it on "y")."""
    import transformers

    from lorakit.models import load_model

    calls = []
    for cls in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        for method in ("from_pretrained", "from_config"):
            original = getattr(getattr(transformers, cls), method, None)
            if original is None:
                continue

            def spy(*args, _original=original, _name=f"{cls}.{method}", **kwargs):
                calls.append((_name, kwargs.get("trust_remote_code")))
                return _original(*args, **kwargs)
            monkeypatch.setattr(getattr(transformers, cls), method, spy)
    load_model(base_dir, quantize=quantize)
    names = {name for name, _ in calls}
    assert {"AutoConfig.from_pretrained", "AutoTokenizer.from_pretrained"} <= names
    assert ("AutoModelForCausalLM.from_config" if quantize else "AutoModelForCausalLM.from_pretrained") in names
    assert [c for c in calls if c[1] is not False] == []


# --- 9, 10, 11: broken or inconsistent adapters -------------------------------------------------

def corrupt(adapter: Path, how: str) -> Path:
    """Damage adapter_model.safetensors in one of the ways a file gets damaged."""
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if how == "bad header JSON":
        data = struct.pack("<Q", 7) + b"{broken"
    elif how == "2^62 header length":
        data = struct.pack("<Q", 2**62) + data[8:]
    elif how == "offsets past the end":
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"][1] += 10**6
        text = json.dumps(header).encode()
        data = struct.pack("<Q", len(text)) + text + data[8 + n:]
    elif how == "truncated":
        data = data[:-16]
    elif how == "0 bytes":
        data = b""
    if how == "symlink to a system file":
        path.unlink()
        path.symlink_to("/etc/passwd")
    else:
        path.write_bytes(data)
    return path


BROKEN = ["bad header JSON", "2^62 header length", "offsets past the end", "truncated", "0 bytes",
          "symlink to a system file"]


@pytest.mark.parametrize("how", BROKEN)
def test_broken_adapter_safetensors_is_an_error_naming_the_file(tmp_path, base_dir, capsys, how):
    path = corrupt(make_adapter(base_dir, tmp_path / "adapter"), how)
    assert main(["inspect", str(path.parent)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorakit inspect: error: {path}")
    assert "not a valid safetensors file" in err
    if how == "symlink to a system file":
        assert "(a link to /etc/passwd)" in err


@pytest.mark.parametrize("how", BROKEN)
def test_broken_model_safetensors_is_an_error_naming_the_file(tmp_path, base_dir, capsys, how):
    model = copy_model(base_dir, tmp_path / "model")
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").replace(model / "adapter_model.safetensors")  # corrupt() wants this name
    path = corrupt(model, how).rename(model / "model.safetensors")
    for quantize in ("none", "nf4"):
        assert main(["generate", "--model", str(model), "--quantize", quantize, "--raw", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lorakit generate: error: {path}") and "not a valid safetensors file" in err


def test_invalid_model_config_json_is_an_error_naming_the_file(tmp_path, base_dir, capsys):
    model = copy_model(base_dir, tmp_path / "model")
    for text, says in (('{"model_type": "llama",', "not valid JSON (line 1, column 24"),
                       ('["llama"]', "expected a JSON object {...}, found a list"),
                       (b"\xff\xfe{}", "not UTF-8 text (byte 0); expected a JSON object")):
        (model / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        assert main(["generate", "--model", str(model), "--raw", "hi"]) == 2
        assert capsys.readouterr().err == f"lorakit generate: error: {model / 'config.json'}: {says}" + (
            ": Expecting property name enclosed in double quotes)\n" if "JSON (" in says else "\n")


def rewrite(adapter: Path, tensors=None, config=None) -> Path:
    if tensors is not None:
        save_file(tensors, adapter / "adapter_model.safetensors")
    if config is not None:
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_inspect_refuses_inconsistent_adapters(tmp_path, base_dir, capsys):
    good = make_adapter(base_dir, tmp_path / "good")
    tensors = load_file(good / "adapter_model.safetensors")
    config = json.loads((good / "adapter_config.json").read_text())
    q = "base_model.model.model.layers.0.self_attn.q_proj"

    def inspect(name, **changes) -> str:
        adapter = copy_model(good, tmp_path / name)
        rewrite(adapter, **changes)
        assert main(["inspect", str(adapter)]) == 2
        return capsys.readouterr().err

    err = inspect("list", config=[config])
    assert "adapter_config.json: expected a JSON object {...}, found a list" in err
    err = inspect("no-B", tensors={k: v for k, v in tensors.items() if k != f"{q}.lora_B.weight"})
    assert f"{q}.lora_A.weight has no lora_B.weight partner" in err
    err = inspect("ranks", tensors={**tensors, f"{q}.lora_B.weight": torch.zeros(64, 3)})
    assert "  model.layers.0.self_attn.q_proj: A (4, 64) and B (64, 3) are not (r, in) and (out, r)" in err
    err = inspect("dotdot", tensors={**tensors, "base_model.model.../../etc.lora_A.weight": torch.zeros(4, 64)})
    assert "tensor name 'base_model.model.../../etc.lora_A.weight' is not a module path" in err
    err = inspect("r", config={**config, "r": 8})
    assert ("  model.layers.0.self_attn.q_proj: the tensors have rank 4 but adapter_config.json gives r=8"
            in err)
    nan = tensors[f"{q}.lora_A.weight"].clone()
    nan[0, 0] = float("nan")
    err = inspect("nan", tensors={**tensors, f"{q}.lora_A.weight": nan})
    assert f"{q}.lora_A.weight holds NaN or infinite values" in err
    err = inspect("int8", tensors={**tensors, f"{q}.lora_A.weight": torch.ones(4, 64, dtype=torch.int8)})
    assert f"{q}.lora_A.weight is torch.int8, not a floating-point tensor" in err


def test_nan_and_int8_adapters_are_refused_on_load(tmp_path, base_dir, capsys):
    good = make_adapter(base_dir, tmp_path / "good")
    tensors = load_file(good / "adapter_model.safetensors")
    q = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    for name, bad in (("inf", torch.full((64, 4), float("inf"))), ("int8", torch.ones(64, 4, dtype=torch.int8))):
        adapter = rewrite(copy_model(good, tmp_path / name), tensors={**tensors, q: bad})
        assert main(["generate", "--model", str(base_dir), "--adapter", str(adapter), "--raw", "hi"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lorakit generate: error: {adapter / 'adapter_model.safetensors'}: not a usable adapter")
        assert q in err


def test_a_runaway_target_regex_is_refused_not_run(forkserver, tmp_path, base_dir):
    """"((.)*)*!" backtracks 2^n times on an n-character name: matching it against the model's
    module names would never finish. A process of its own, so that the hang (before the fix) ends."""
    adapter = make_adapter(base_dir, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    rewrite(adapter, config={**config, "target_modules": "((.)*)*!"})
    try:
        result = forkserver.run("generate", "--model", base_dir, "--adapter", adapter, "--raw", "hi")
    except subprocess.TimeoutExpired:
        pytest.fail("lorakit generate hung on a catastrophic target_modules regex")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "target_modules: '((.)*)*!' can align with a 128-character module name in more than" in result.stderr


def test_adapter_files_are_written_0644_under_umask_022(tmp_path, base_dir):
    mask = os.umask(0o022)
    try:
        adapter = make_adapter(base_dir, tmp_path / "adapter")
    finally:
        os.umask(mask)
    modes = {f.name: f.stat().st_mode & 0o777 for f in adapter.iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


# --- eval, generate, quantize -------------------------------------------------------------------

def test_eval_refuses_a_non_string_answer_naming_the_record(tmp_path, base_dir, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d", "answer": 5}\n')
    assert main(["eval", "--model", str(base_dir), "--data", str(data)]) == 2
    assert capsys.readouterr().err == (f"lorakit eval: error: {data}:2: answer=5 must be a string (the reference "
                                       "the model's reply is compared with)\n")


@pytest.mark.parametrize("argv, says", [
    (["eval", "--data", "x.jsonl", "--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["eval", "--data", "x.jsonl", "--limit", "-1"], "argument --limit: must be an integer >= 1, got -1"),
    (["generate", "hi", "--temperature", "-1"], "argument --temperature: -1 is not a temperature: 0 for greedy "
                                                 "decoding, or a number > 0 to sample (e.g. 0.7)"),
    (["generate", "hi", "--temperature", "nan"], "argument --temperature: nan is not a temperature"),
    (["chat", "--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got 0"),
])
def test_bad_numbers_are_refused_before_anything_loads(capsys, argv, says):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"lorakit {argv[0]}: error: {says}" in capsys.readouterr().err


def test_quantize_needs_no_tokenizer_and_copies_its_files_when_present(tmp_path, base_dir, capsys):
    bare = copy_model(base_dir, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    assert main(["quantize", str(bare), "--out", str(tmp_path / "q-bare")]) == 0
    assert sorted(p.name for p in (tmp_path / "q-bare").iterdir()) == ["config.json", "generation_config.json",
                                                                         "model.safetensors"]
    assert main(["quantize", str(base_dir), "--out", str(tmp_path / "q")]) == 0
    tokenizer_files = sorted(p.name for p in base_dir.iterdir() if p.name.startswith(("tokenizer", "special", "chat")))
    for name in tokenizer_files:
        assert (tmp_path / "q" / name).read_bytes() == (base_dir / name).read_bytes()
    from lorakit.models import load_model

    model, tokenizer = load_model(tmp_path / "q")
    assert tokenizer("hi")["input_ids"] == load_model(base_dir)[1]("hi")["input_ids"]
