import json
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from test_inject import logits, randomize_adapters

from lorakit import LoraConfig, add_lora, load_adapter, save_adapter
from lorakit.inject import adapter_configs
from lorakit.layer import LoraLayer

peft = pytest.importorskip("peft")


def test_round_trip_and_file_layout(tmp_path, tokens):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    randomize_adapters(model)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = logits(model, tokens)
    save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert list(config) == sorted(config)
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["modules_to_save"] == ["lm_head"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] == (16, 4)
    assert shapes["base_model.model.lm_head.weight"] == (96, 32)
    assert len(shapes) == 2 * 2 * 2 + 1

    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh, tokens), expected, rtol=0, atol=0)


def _peft_model(base, **kwargs):
    config = peft.LoraConfig(init_lora_weights=False, **kwargs)  # random B: adapters change logits
    torch.manual_seed(3)
    return peft.get_peft_model(base, config)


PEFT_CASES = [
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    (tiny_llama, dict(r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True,
                      rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3})),
    (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "up_proj"], modules_to_save=["lm_head"])),
    (tiny_llama, dict(r=2, lora_alpha=2, target_modules=["k_proj"], layers_to_transform=[1], layers_pattern="layers")),
    (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, bias="lora_only")),
    (tiny_gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
]


@pytest.mark.parametrize("make, kwargs", PEFT_CASES)
def test_peft_adapter_loads_into_lorakit(tmp_path, tokens, make, kwargs):
    pm = _peft_model(make(), **kwargs)
    if kwargs.get("bias", "none") != "none":
        with torch.no_grad():  # trained biases differ from the base's
            for n, p in pm.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.25)
    expected = logits(pm, tokens)
    pm.save_pretrained(tmp_path)
    ours = make()
    assert not torch.allclose(logits(ours, tokens), expected)
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, tokens), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make, kwargs", PEFT_CASES)
def test_lorakit_adapter_loads_into_peft(tmp_path, tokens, make, kwargs):
    config = LoraConfig.from_peft_dict(peft.LoraConfig(**kwargs).to_dict())
    ours = add_lora(make(), config.replace(init="random"))
    randomize_adapters(ours, seed=5)
    if config.bias != "none":
        with torch.no_grad():
            for n, p in ours.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.25)
    expected = logits(ours, tokens)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(logits(theirs, tokens), expected, rtol=1e-5, atol=1e-5)


def test_strict_loading_names_missing_unexpected_and_mismatched(tmp_path, tokens):
    model = add_lora(tiny_llama(), LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing_key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    broken = {k: v for k, v in tensors.items() if k != missing_key}
    broken["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 32)
    broken["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 33)
    save_file(broken, path)
    target = tiny_llama()
    before = logits(target, tokens)
    with pytest.raises(ValueError) as e:
        load_adapter(target, tmp_path)
    msg = str(e.value)
    assert f"missing keys: {missing_key}" in msg
    assert "unexpected keys: base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in msg
    assert "q_proj.lora_A.weight: file (4, 33) vs model (4, 32)" in msg
    # the model is left exactly as it was
    assert adapter_configs(target) == {}
    assert not any(isinstance(m, LoraLayer) for m in target.modules())
    assert torch.equal(logits(target, tokens), before)


def test_adapter_for_another_base_model_is_refused(tmp_path):
    save_adapter(add_lora(tiny_llama(hidden=32), LoraConfig(r=4)), tmp_path)
    with pytest.raises(ValueError, match=r"shape mismatches: .*file \(4, 32\) vs model \(4, 64\)"):
        load_adapter(tiny_llama(hidden=64), tmp_path)


def test_pickle_files_are_never_unpickled(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                               "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(ValueError, match="pickle file.*never unpickles"):
        load_adapter(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_save_leaves_no_temporary_files_and_keeps_old_adapter_on_failure(tmp_path, monkeypatch):
    model = add_lora(tiny_llama(), LoraConfig(r=4))
    save_adapter(model, tmp_path)
    old = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.adapter_io.save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_save_that_fails_on_the_config_keeps_the_old_weights_with_it(tmp_path, monkeypatch):
    model = add_lora(tiny_llama(), LoraConfig(r=4))
    save_adapter(model, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    randomize_adapters(model)
    write_text = Path.write_text

    def fail_on_config(self, *args, **kwargs):
        if ".adapter_config.json." in self.name:
            raise OSError("disk full")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", fail_on_config)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path)  # the new weights were written in full before the config failed
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_second_adapter_saves_and_loads_under_its_name(tmp_path, tokens):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, targets=["q_proj"], init="random"), "first")
    add_lora(model, LoraConfig(r=2, targets=["v_proj"], init="random"), "second")
    save_adapter(model, tmp_path / "second", name="second")
    with safe_open(tmp_path / "second" / "adapter_model.safetensors", "pt") as f:
        assert all("v_proj" in k and ".second" not in k for k in f.keys())
    from lorakit import set_adapter

    set_adapter(model, "second")
    expected = logits(model, tokens)
    other = load_adapter(tiny_llama(), tmp_path / "second", name="mine")
    assert list(adapter_configs(other)) == ["mine"]
    torch.testing.assert_close(logits(other, tokens), expected)


# --- "all-linear" is saved as the modules it adapted, so peft adapts exactly those -----------------

def tiny_mixtral():
    """Mixtral: besides q/k/v/o_proj it has a router `mlp.gate` and 3-D expert weights, which peft's
    own "all-linear" wraps too (as target_parameters) while lorakit's all-linear leaves them."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    return MixtralForCausalLM(config).eval()


def _adapted(model):
    """Names of the LoRA-wrapped modules, relative to the base model (lorakit's or peft's)."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) or isinstance(module, peft.tuners.lora.LoraLayer):
            names.add(name.removeprefix("base_model.model."))
    return names


ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.mark.parametrize("make, saved", [
    (tiny_llama, ATTENTION + ["gate_proj", "up_proj", "down_proj"]),
    (tiny_mixtral, ATTENTION),
], ids=["llama", "mixtral"])
def test_all_linear_is_saved_as_the_adapted_modules_and_peft_adapts_exactly_those(tmp_path, tokens, make, saved):
    ours = add_lora(make(), LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    expected = logits(ours, tokens)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == saved
    adapted = _adapted(ours)
    assert len(adapted) == 2 * len(saved)

    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    assert _adapted(theirs) == adapted  # no router, no experts: what lorakit trained, nothing more
    torch.testing.assert_close(logits(theirs, tokens), expected, rtol=1e-5, atol=1e-5)
    again = load_adapter(make(), tmp_path)
    assert _adapted(again) == adapted
    torch.testing.assert_close(logits(again, tokens), expected, rtol=0, atol=0)


def test_all_linear_is_saved_as_full_names_when_a_name_also_ends_an_unadapted_module(tmp_path):
    class Model(torch.nn.Module):  # the head is called `out`, like a linear inside the block
        def __init__(self):
            super().__init__()
            self.block = torch.nn.ModuleDict({"out": torch.nn.Linear(4, 4), "inner": torch.nn.Linear(4, 4)})
            self.out = torch.nn.Linear(4, 3)

        def get_output_embeddings(self):
            return self.out

    model = add_lora(Model(), LoraConfig(r=2, targets="all-linear"))
    save_adapter(model, tmp_path)
    # ["out", "inner"] would adapt the head too
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["block.out", "block.inner"]
    assert _adapted(load_adapter(Model(), tmp_path)) == {"block.out", "block.inner"}
