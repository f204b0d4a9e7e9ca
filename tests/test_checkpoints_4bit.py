"""4-bit checkpoints: lorakit's streaming NF4 loader, `lorakit quantize`, and interop with
transformers + bitsandbytes in both directions."""

import json

import pytest
import torch
from conftest import char_tokenizer, tiny_llama
from safetensors import safe_open

from lorakit.cli import main
from lorakit.models import load_model
from lorakit.nf4 import NF4Linear, quantize_linears, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")


def model_dir(path, tie=False):
    tok = char_tokenizer()
    model = tiny_llama(hidden=64, vocab=len(tok), tie=tie, init_range=0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def tokens():
    return torch.randint(3, 99, (2, 12), generator=torch.Generator().manual_seed(0))


def read(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def bnb_model(path, compute_dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


@pytest.mark.parametrize("tie", [False, True])
def test_streaming_nf4_load_equals_quantizing_in_memory(tmp_path, tie):
    original = model_dir(tmp_path, tie=tie)
    model, _ = load_model(tmp_path, quantize="nf4")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14 and "lm_head" not in layers
    for name, layer in layers.items():
        expected = quantize_nf4(original.get_submodule(name).weight.detach())
        assert torch.equal(layer.weight, expected.packed) and torch.equal(layer.weight_absmax, expected.absmax)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = quantize_linears(original, skip={"lm_head"})
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, reference(tokens()).logits)
    assert not any(p.requires_grad for p in model.parameters())


def test_lorakit_quantize_checkpoint_loads_in_transformers_bitsandbytes(tmp_path, capsys):
    model_dir(tmp_path / "fp32")
    assert main(["quantize", str(tmp_path / "fp32"), "--out", str(tmp_path / "nf4"), "--compute-dtype", "float32"]) == 0
    assert "4-bit weights" in capsys.readouterr().out
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes" and config["bnb_4bit_use_double_quant"] is True

    theirs = bnb_model(tmp_path / "fp32")  # bitsandbytes quantizes the original itself
    theirs.save_pretrained(tmp_path / "bnb")
    ours, bnb_saved = read(tmp_path / "nf4"), read(tmp_path / "bnb")
    assert ours.keys() == bnb_saved.keys()
    for key in ours:  # every packed weight, absmax, code table and quant-state JSON, byte for byte
        assert ours[key].dtype == bnb_saved[key].dtype and torch.equal(ours[key], bnb_saved[key]), key

    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(loaded(tokens()).logits, theirs(tokens()).logits)


def test_transformers_bitsandbytes_checkpoint_loads_in_lorakit(tmp_path):
    model_dir(tmp_path / "fp32")
    theirs = bnb_model(tmp_path / "fp32")
    theirs.save_pretrained(tmp_path / "bnb")
    char_tokenizer().save_pretrained(tmp_path / "bnb")
    ours, _ = load_model(tmp_path / "bnb")  # a 4-bit checkpoint loads in NF4 without asking
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, NF4Linear) and layer.compute_dtype == torch.float32
    bnb_state = theirs.model.layers[1].mlp.down_proj.weight.quant_state
    assert torch.equal(layer.weight, theirs.model.layers[1].mlp.down_proj.weight.data)
    assert torch.equal(layer.weight_absmax, bnb_state.absmax)
    # Reference: the model with bitsandbytes' own dequantized weights in plain nn.Linear layers.
    # (bitsandbytes' CPU 4-bit matmul itself differs from x @ dequantize(W).T by ~1e-2 here.)
    reference = model_dir(tmp_path / "again")  # same seed: same embeddings, norms and head
    with torch.no_grad():
        for name, module in theirs.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                reference.get_submodule(name).weight.copy_(w)
                assert torch.equal(ours.get_submodule(name).dequantize_weight(torch.float32), w)
        torch.testing.assert_close(ours(tokens()).logits, reference(tokens()).logits, rtol=1e-5, atol=1e-5)


def test_missing_weights_are_an_error(tmp_path):
    model_dir(tmp_path)
    tensors = read(tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj'\]"):
        load_model(tmp_path, quantize="nf4")
