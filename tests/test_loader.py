"""models.CheckpointLoader: a model built on the meta device and read from its checkpoint part by
part (what FSDP start-up uses) equals the model transformers loads, adapters included."""

import os

import pytest
import torch
from conftest import tiny_llama

from lorakit import LoraConfig, add_lora
from lorakit.models import CheckpointLoader


def saved(tmp_path, tie=False):
    model = tiny_llama(tie=tie, init_range=0.1)
    model.save_pretrained(tmp_path)
    return model


def real(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if not t.is_meta}


@pytest.mark.parametrize("tie", [False, True])
def test_part_by_part_load_equals_the_loaded_model_with_the_same_adapters(tmp_path, tie, tokens):
    from transformers import AutoModelForCausalLM

    saved(tmp_path, tie)
    config = LoraConfig(r=4, alpha=8, init="random")  # B != 0: the adapters change the logits
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.manual_seed(3)
    add_lora(reference, config)

    loader = CheckpointLoader(tmp_path)
    torch.manual_seed(3)
    add_lora(loader.model, config)  # before any weight is read: adapters on the CPU, initialised
    adapters = real(loader.model)
    assert adapters and all("lora_" in n for n in adapters)
    first, second = loader.model.model.layers
    loader.fill(first)
    loaded = real(loader.model).keys() - adapters.keys()
    assert loaded == {n for n, _ in first.named_parameters(prefix="model.layers.0") if "lora_" not in n}
    loader.fill(second)
    assert not any(t.is_meta for t in second.parameters())
    assert loader.model.model.embed_tokens.weight.is_meta  # the root comes last
    loader.fill()

    model = loader.model.eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    theirs = dict(reference.state_dict())
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.requires_grad
    assert not model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad
    assert torch.equal(model(tokens).logits, reference(tokens).logits)


def test_modules_to_save_copies_are_filled_from_the_checkpoint(tmp_path):
    base = saved(tmp_path)
    loader = CheckpointLoader(tmp_path)
    add_lora(loader.model, LoraConfig(r=4, modules_to_save=["lm_head"]))
    loader.fill()
    head = loader.model.lm_head
    copy = head.modules_to_save["default"]
    assert torch.equal(copy.weight, base.lm_head.weight) and copy.weight.requires_grad
    assert copy.weight.data_ptr() != head.original_module.weight.data_ptr()
    assert not head.original_module.weight.requires_grad


def test_full_fine_tuning_keeps_the_skeleton_trainable(tmp_path):
    saved(tmp_path)
    loader = CheckpointLoader(tmp_path)
    loader.model.requires_grad_(True)
    loader.fill()
    assert all(p.requires_grad and not p.is_meta for p in loader.model.parameters())


def test_a_checkpoint_that_does_not_fit_names_what_is_missing_and_unexpected(tmp_path):
    from safetensors.torch import load_file, save_file

    saved(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loader = CheckpointLoader(tmp_path)
    loader.fill(loader.model.model.layers[1])  # a part may lack tensors: only the end checks
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\], "
                                         r"unexpected \['model.layers.0.mlp.extra.weight'\]"):
        loader.fill()


# --- transformers' own checkpoint conversion: renamed keys, per-expert tensors fused -------------

def _mixtral():
    from test_architectures import tiny_model

    return tiny_model("mixtral", seed=1)


@pytest.mark.parametrize("layout", ["per-expert", "fused"])
def test_mixtral_loads_layer_by_layer_from_either_expert_layout(tmp_path, tokens, layout):
    """save_pretrained writes Mixtral's experts as transformers 4 did (block_sparse_moe.experts.N.w1/w2/
    w3); the model holds them fused (mlp.experts.gate_up_proj (E, 2I, H), down_proj (E, H, I)).
    Both layouts load, one layer at a time, exactly as from_pretrained loads them."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    base = _mixtral()
    base.save_pretrained(tmp_path)
    keys = set(__import__("safetensors").safe_open(tmp_path / "model.safetensors", "pt").keys())
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in keys  # transformers' legacy layout
    if layout == "fused":
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "model.safetensors",
                  metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(tmp_path).eval()

    loader = CheckpointLoader(tmp_path)
    first, second = loader.model.model.layers
    loader.fill(first)
    assert first.mlp.experts.gate_up_proj.shape == (4, 128, 32) and not first.mlp.experts.gate_up_proj.is_meta
    assert second.mlp.experts.gate_up_proj.is_meta  # the next layer's experts are not read yet
    loader.fill(second)
    loader.fill()
    ours, theirs = loader.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loader.model.eval()(tokens).logits, reference(tokens).logits)


def test_gpt_neox_head_is_read_from_embed_out(tmp_path, tokens):
    from transformers import AutoModelForCausalLM
    from test_architectures import tiny_model

    tiny_model("gpt_neox").save_pretrained(tmp_path)
    keys = set(__import__("safetensors").safe_open(tmp_path / "model.safetensors", "pt").keys())
    assert "embed_out.weight" in keys and "lm_head.weight" not in keys
    loader = CheckpointLoader(tmp_path, quantize="nf4")
    loader.fill()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loader.model.lm_head.weight, reference.embed_out.weight
                       if hasattr(reference, "embed_out") else reference.lm_head.weight)


def test_qlora_stores_expert_weights_in_nf4_as_they_are_read(tmp_path):
    from lorakit.nf4 import NF4Weight, nf4_weights

    _mixtral().save_pretrained(tmp_path)
    loader = CheckpointLoader(tmp_path, quantize="nf4")
    first = loader.model.model.layers[0]
    loader.fill(first)
    experts = first.mlp.experts
    assert isinstance(experts.parametrizations.gate_up_proj[0], NF4Weight)
    assert experts.parametrizations.gate_up_proj.original0.dtype == torch.uint8
    assert not [n for n, _ in experts.named_parameters()]  # nothing of the experts trains or is float
    loader.fill()
    states = nf4_weights(loader.model)
    assert sorted(n for n in states if "experts" in n) == [
        f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    assert states["model.layers.1.mlp.experts.down_proj"].shape == (4, 32, 64)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's mappings")
@pytest.mark.parametrize("kind", ["float32", "nf4", "4-bit checkpoint"])
def test_the_loaded_model_keeps_no_mapping_of_the_checkpoint(tmp_path, kind, tokens):
    """Every tensor the loader keeps is a copy: safetensors' tensors point into its mapping of the
    whole file, and one kept tensor (an NF4 model's embedding) would keep the mapping, and every
    page read so far resident (the whole checkpoint, read to be quantized)."""
    import gc

    from lorakit.cli import main

    reference = saved(tmp_path / "base")
    path = tmp_path / "base"
    if kind == "4-bit checkpoint":
        assert main(["quantize", str(path), "--out", str(tmp_path / "nf4"), "--compute-dtype", "float32"]) == 0
        path = tmp_path / "nf4"
    loader = CheckpointLoader(path, quantize="nf4" if kind == "nf4" else None)
    loader.fill()
    gc.collect()
    mapped = [line for line in open("/proc/self/maps") if str(path / "model.safetensors") in line]
    assert mapped == []
    if kind == "float32":
        assert torch.equal(loader.model.eval()(tokens).logits, reference.eval()(tokens).logits)
