"""LoRA on mixture-of-experts parameters (target_parameters, layer.LoraParameter): peft's per-expert
update and file format both ways, training, merge / unmerge as equations, NF4 experts (QLoRA),
deleting and disabling adapters. Tiny Mixtral, Qwen3-MoE and gpt-oss (whose experts are stored
(E, in, out), `is_transposed`) from tests/test_architectures.py."""

import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_architectures import tiny_model

from lorakit import LoraConfig, add_lora
from lorakit.adapter_io import adapter_state_dict, load_adapter, save_adapter
from lorakit.config import ConfigError
from lorakit.inject import (
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    parameter_adapters,
    set_adapter,
    trainable_parameters,
    unmerge,
)
from lorakit.layer import LoraLayer, LoraParameter
from lorakit.nf4 import dequantize, nf4_weights, quantize_parameter_
from lorakit.surgery import expert_parameters

MOE = ["mixtral", "qwen3_moe", "gpt_oss"]
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


def experts_lora(model, init="random", **kw):
    return add_lora(model, LoraConfig(r=2, alpha=4, targets=[], target_parameters=EXPERTS, init=init, **kw))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def peft_experts(model_type, init=False):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=EXPERTS, init_lora_weights=init)
    return peft.get_peft_model(tiny_model(model_type), config).eval()


def expert_weights(model) -> dict[str, torch.Tensor]:
    """The value of every expert parameter, as the model computes with it (a copy)."""
    return {f"{m}.{leaf}": getattr(model.get_submodule(m), leaf).detach().clone() for m, leaf in expert_parameters(model)}


@pytest.mark.parametrize("model_type", MOE)
def test_peft_loads_lorakit_adapter(model_type, tmp_path, tokens):
    ours = experts_lora(tiny_model(model_type))
    assert not torch.allclose(logits(ours, tokens), logits(tiny_model(model_type), tokens))  # B != 0
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_model(model_type), tmp_path).eval()
    torch.testing.assert_close(logits(theirs, tokens), logits(ours, tokens), rtol=1e-5, atol=1e-5)
    # the same keys peft writes for the same config; 2 layers x 2 parameters x (A, B)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == set(peft.get_peft_model_state_dict(peft_experts(model_type)))
    assert len(keys) == 8


@pytest.mark.parametrize("model_type", MOE)
def test_lorakit_loads_peft_adapter(model_type, tmp_path, tokens):
    theirs = peft_experts(model_type)  # init_lora_weights=False: B != 0
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_model(model_type), tmp_path)
    torch.testing.assert_close(logits(ours, tokens), logits(theirs, tokens), rtol=1e-5, atol=1e-5)
    assert set(adapter_state_dict(ours)) == set(load_file(tmp_path / "adapter_model.safetensors"))
    assert not torch.allclose(logits(ours, tokens), logits(tiny_model(model_type), tokens))


def test_update_is_per_expert_as_peft_defines_it():
    """ΔW[e] = scale · B[:, e::E] A[e·r:(e+1)·r], for (E, out, in) and, transposed, (E, in, out)."""
    for model_type in ("mixtral", "gpt_oss"):
        base = tiny_model(model_type)
        model = experts_lora(tiny_model(model_type))
        for module_name, module, leaf, lora in parameter_adapters(model):
            a, b = lora.lora_A["default"].weight, lora.lora_B["default"].weight   # (r·E, in), (out, r·E)
            experts, r = lora.num_experts, 2
            assert experts == 4 and a.shape[0] == b.shape[1] == r * experts
            before = getattr(base.get_submodule(module_name), leaf)
            after = getattr(module, leaf)
            for e in range(experts):
                delta = 2.0 * b[:, e::experts] @ a[e * r:(e + 1) * r]                # (out, in), scale 4/2
                if model_type == "gpt_oss":
                    delta = delta.T                                                     # stored (in, out)
                torch.testing.assert_close(after[e] - before[e], delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", MOE)
def test_training_step_changes_adapters_only(model_type, tokens):
    model = experts_lora(tiny_model(model_type))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r · E · (in + out) per parameter: Mixtral 2·4·(32+128) + 2·4·(64+32) per layer, 2 layers
    per_layer = {"mixtral": 8 * 160 + 8 * 96, "qwen3_moe": 8 * 96 + 8 * 64, "gpt_oss": 8 * 160 + 8 * 96}
    assert trainable_parameters(model).trainable == 2 * per_layer[model_type]
    model.train()
    loss = model(tokens, labels=tokens).loss
    assert torch.isfinite(loss)
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert all(not torch.equal(after[n], p) for n, p in trainable.items())


@pytest.mark.parametrize("model_type", MOE)
def test_merge_equals_unmerged_and_unmerge_restores(model_type, tokens):
    model = experts_lora(tiny_model(model_type))
    original = {n: model.get_submodule(n.rsplit(".", 1)[0]).parametrizations[n.rsplit(".", 1)[1]].original.clone()
                for n in expert_weights(model)}
    unmerged, adapted = logits(model, tokens), expert_weights(model)
    merge(model)
    merge(model)  # twice: a no-op
    torch.testing.assert_close(logits(model, tokens), unmerged, rtol=1e-5, atol=1e-5)
    for name, w in adapted.items():   # the stored weight is now W + ΔW
        module, leaf = name.rsplit(".", 1)
        torch.testing.assert_close(model.get_submodule(module).parametrizations[leaf].original, w,
                                   rtol=0, atol=1e-6)
    unmerge(model)
    for name, w in original.items():
        module, leaf = name.rsplit(".", 1)
        torch.testing.assert_close(model.get_submodule(module).parametrizations[leaf].original, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, tokens), unmerged, rtol=1e-5, atol=1e-5)
    plain = merge_and_unload(model)
    assert not list(parameter_adapters(plain)) and not any(hasattr(m, "parametrizations") for m in plain.modules())
    torch.testing.assert_close(logits(plain, tokens), unmerged, rtol=1e-5, atol=1e-5)


def test_disable_and_delete_give_the_base_back(tokens):
    base = logits(tiny_model("mixtral"), tokens)
    model = experts_lora(tiny_model("mixtral"))
    merge(model)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base, rtol=1e-5, atol=1e-5)
    assert all(lora.merged_adapters == ["default"] for *_, lora in parameter_adapters(model))  # merged back
    unmerge(model)
    delete_adapter(model, "default")
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    assert dict(model.named_parameters()).keys() == dict(tiny_model("mixtral").named_parameters()).keys()
    torch.testing.assert_close(logits(model, tokens), base, rtol=1e-6, atol=1e-6)


def test_qlora_on_nf4_experts(tokens):
    """dequantize -> add ΔW: the adapted NF4 model computes as the float model holding the
    dequantized experts with the same adapters; merge refuses, merge_and_unload dequantizes."""
    quantized = tiny_model("mixtral")
    for module_name, leaf in expert_parameters(quantized):
        quantize_parameter_(quantized.get_submodule(module_name), leaf)
    reference = tiny_model("mixtral")
    with torch.no_grad():
        for name, state in nf4_weights(quantized).items():
            module, leaf = name.rsplit(".", 1)
            getattr(reference.get_submodule(module), leaf).copy_(dequantize(state, torch.float32))
    experts_lora(quantized, init="random")
    experts_lora(reference, init="random")
    with torch.no_grad():
        for (_, _, _, q), (_, _, _, f) in zip(parameter_adapters(quantized), parameter_adapters(reference)):
            q.lora_A["default"].weight.copy_(f.lora_A["default"].weight)
            q.lora_B["default"].weight.copy_(f.lora_B["default"].weight)
    expected = logits(reference, tokens)
    torch.testing.assert_close(logits(quantized, tokens), expected, rtol=1e-5, atol=1e-5)
    assert len(nf4_weights(quantized)) == 4  # still 4-bit: 2 layers x 2 parameters
    with pytest.raises(ValueError, match="4 bits"):
        merge(quantized)
    quantized.train()
    loss = quantized(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in quantized.named_parameters() if ".lora_B." in n)
    quantized.eval()
    plain = merge_and_unload(quantized)
    assert not nf4_weights(plain) and not any(hasattr(m, "parametrizations") for m in plain.modules())
    torch.testing.assert_close(logits(plain, tokens), expected, rtol=1e-5, atol=1e-5)


def test_config_rules_and_errors():
    with pytest.raises(ConfigError) as e:
        LoraConfig(targets=[], target_parameters=EXPERTS, dropout=0.1, dora=True, init="pissa")
    assert len(e.value.problems) == 3  # dropout, dora, init: all at once
    with pytest.raises(ConfigError, match="non-empty list of parameter names"):
        LoraConfig(target_parameters="experts.gate_up_proj")
    with pytest.raises(ValueError, match=r"match no parameter; mixture-of-experts parameters here: "
                                         r"experts.down_proj, experts.gate_up_proj"):
        add_lora(tiny_model("mixtral"), LoraConfig(targets=[], target_parameters=["gate_proj"]))
    model = experts_lora(tiny_model("mixtral"))
    with pytest.raises(ValueError, match="must adapt the same parameters"):
        add_lora(model, LoraConfig(targets=[], target_parameters=["experts.down_proj"]), name="other")


def test_all_linear_warning_points_at_target_parameters():
    with pytest.warns(UserWarning, match=r"4 mixture-of-experts weights are not adapted .*lora\.target_parameters"):
        add_lora(tiny_model("mixtral"), LoraConfig(targets="all-linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = add_lora(tiny_model("mixtral"), LoraConfig(targets="all-linear", target_parameters=EXPERTS))
    assert sum(isinstance(m, LoraParameter) for m in model.modules()) == 4


def test_second_adapter_on_the_same_parameters(tokens, tmp_path):
    """Several adapters share one LoraParameter per parameter; each saves and loads on its own."""
    model = experts_lora(tiny_model("mixtral"))
    add_lora(model, LoraConfig(r=2, alpha=4, targets=[], target_parameters=EXPERTS, init="random"), name="second")
    assert sum(isinstance(m, LoraParameter) for m in model.modules()) == 4
    save_adapter(model, tmp_path, name="second")
    set_adapter(model, "second")
    expected = logits(model, tokens)
    loaded = load_adapter(tiny_model("mixtral"), tmp_path)
    torch.testing.assert_close(logits(loaded, tokens), expected, rtol=1e-5, atol=1e-5)


def test_adapter_report_of_an_experts_adapter(tmp_path):
    """norm_delta of a parameter's adapter is ||ΔW|| over all experts, as the model computes it."""
    from lorakit.adapter_io import adapter_report

    base = tiny_model("mixtral")
    model = experts_lora(tiny_model("mixtral"))
    save_adapter(model, tmp_path)
    report = adapter_report(tmp_path)
    assert report["parameters"] == 2 * (8 * 160 + 8 * 96)
    by_module = {m["module"]: m for m in report["modules"]}
    for prefix, leaf in (("model.layers.0.mlp.experts.base_layer", "gate_up_proj"),
                         ("model.layers.0.mlp.experts", "down_proj")):
        entry = by_module[prefix]
        assert entry["r"] == 2 and entry["experts"] == 4 and entry["scale"] == 2.0
        delta = getattr(model.get_submodule("model.layers.0.mlp.experts"), leaf) - \
            getattr(base.get_submodule("model.layers.0.mlp.experts"), leaf)
        assert entry["norm_delta"] == pytest.approx(delta.norm().item(), rel=1e-5)


def test_adapted_weights_are_built_once_per_forward(tokens, monkeypatch):
    """Mixtral's experts read W[e] expert by expert: W + ΔW is built once per forward per
    parameter (2 layers x 2 parameters), not at every read; deleting the adapter removes the hooks."""
    model = experts_lora(tiny_model("mixtral"))
    calls = []
    original = LoraParameter.forward
    monkeypatch.setattr(LoraParameter, "forward", lambda self, w: calls.append(1) or original(self, w))
    expected = logits(model, tokens)
    assert len(calls) == 4
    model.train()
    model(tokens, labels=tokens).loss.backward()  # gradients through the cached weight
    assert len(calls) == 8 and all(p.grad is not None for n, p in model.named_parameters() if ".lora_A." in n)
    model.eval()
    torch.testing.assert_close(logits(model, tokens), expected, rtol=0, atol=0)
    delete_adapter(model, "default")
    experts = model.get_submodule("model.layers.0.mlp.experts")
    assert not experts._forward_hooks and not experts._forward_pre_hooks


def test_a_second_all_linear_adapter_wraps_the_same_layers():
    """The A and B of LoRA on parameters are nn.Linear modules inside the parametrization: a model
    with adapters is searched as its base, so all-linear does not wrap them."""
    config = LoraConfig(r=2, targets="all-linear", target_parameters=EXPERTS)
    model = add_lora(tiny_model("mixtral"), config)
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    add_lora(model, config, name="second")
    assert {n for n, m in model.named_modules() if isinstance(m, LoraLayer)} == wrapped
    assert len(wrapped) == 8 and all(lora.adapter_names() == ["default", "second"]
                                     for *_, lora in parameter_adapters(model))


def test_merge_and_unload_requantizes_nf4_experts(tokens):
    """requantize=True stores merged NF4 experts in NF4 again (the reported error is measured:
    ||deq(nf4(W)) - W|| / ||W|| of each weight), instead of leaving them in float."""
    model = tiny_model("mixtral")
    for module_name, leaf in expert_parameters(model):
        quantize_parameter_(model.get_submodule(module_name), leaf)
    experts_lora(model)
    merged = {n: w.clone() for n, w in expert_weights(model).items()}  # deq(W_nf4) + ΔW
    with pytest.warns(UserWarning, match="merged 4 layers back into NF4") as record:
        merge_and_unload(model, requantize=True)
    assert len(nf4_weights(model)) == 4 and not list(parameter_adapters(model))
    errors = [(torch.linalg.vector_norm(w - merged[n]) / torch.linalg.vector_norm(merged[n])).item()
              for n, w in expert_weights(model).items()]
    assert 0 < max(errors) < 0.2
    assert f"max {max(errors):.4f}" in str(record[0].message)
