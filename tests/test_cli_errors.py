"""Bad inputs to the commands other than `train` (issue 11, section 3): each is refused with a
`lorakit <cmd>: error:` message that names the file or value, never a traceback or a silent result."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import main


def run_cli(*args, stdin: str = "", cwd=None) -> subprocess.CompletedProcess:
    """`lorakit ARGS` in a fresh interpreter (what a user meets, including stdin prompts)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lorakit", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


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
def test_custom_code_in_a_model_directory_never_runs(tmp_path, base_dir, in_file):
    model, marker = custom_code_model(base_dir, tmp_path, in_file)
    for command in (["generate", "--model", model, "--raw", "hi", "--max-new-tokens", "2"], ["chat", "--model", model]):
        result = run_cli(*command, stdin="y\ny\nhello\n")
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
