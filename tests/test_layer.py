"""LoRA layers as equations: LoraLinear's forward is base(x) + scale · B(A(dropout(x))), merge is
W <- W + scale · B A (Wᵀ for a Conv1D), LoraEmbedding adds (B A)ᵀ[ids], and the initialisations."""

import math

import pytest
import torch
from conftest import MLP, tiny_gpt2, tiny_llama
from test_inject import logits, randomize_adapters
from torch import nn

from lorakit import LoraConfig, add_lora, merge, unmerge
from lorakit.inject import lora_layers
from lorakit.layer import LoraEmbedding, LoraLinear


def test_forward_is_the_lora_equation_with_hand_set_weights():
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    model = nn.Sequential(layer)
    add_lora(model, LoraConfig(r=1, alpha=4, targets=["0"]))
    lora = model[0]
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
        lora.lora_B["default"].weight.copy_(torch.tensor([[2.0], [3.0]]))
    x = torch.tensor([[1.0, 1.0, 2.0]])
    # base: [1+2+6+0.5, 4+5+12-0.5] = [9.5, 20.5]; A x = 1 - 2 = -1; scale 4: + 4 * [-2, -3]
    assert model(x).tolist() == [[1.5, 8.5]]


def test_default_init_leaves_the_model_unchanged(tokens):
    base = tiny_llama()
    ref = logits(base, tokens)
    add_lora(base, LoraConfig(r=4, targets="all-linear"))
    assert torch.equal(logits(base, tokens), ref)
    a = base.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound


def test_gaussian_init_std():
    model = nn.Sequential(nn.Linear(512, 512))
    torch.manual_seed(0)
    add_lora(model, LoraConfig(r=4, targets=["0"], init="gaussian"))
    a = model[0].lora_A["default"].weight
    assert a.std().item() == pytest.approx(1 / 4, rel=0.02)
    assert model[0].lora_B["default"].weight.abs().sum() == 0


@pytest.mark.parametrize("make, target", [(tiny_llama, "q_proj"), (tiny_gpt2, "c_attn")])
def test_merge_equation(make, target):
    model = make()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=[target]))
    randomize_adapters(model)
    layer = next(m for _, m in lora_layers(model))
    w = layer.base_layer.weight.detach().clone()
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = 2.0 * b @ a  # (out, in)
    if layer.fan_in_fan_out:  # Conv1D stores W as (in, out)
        delta = delta.T
    merge(model)
    torch.testing.assert_close(layer.base_layer.weight, w + delta, rtol=0, atol=1e-6)
    merge(model)  # merging twice is a no-op
    torch.testing.assert_close(layer.base_layer.weight, w + delta, rtol=0, atol=1e-6)
    unmerge(model)
    torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=1e-6)


def test_embedding_lora_merge_and_forward():
    model = MLP()
    x = torch.tensor([[1, 5, 19]])
    add_lora(model, LoraConfig(r=2, alpha=2, targets=["emb", "fc1"], init="random"))
    assert isinstance(model.emb, LoraEmbedding) and isinstance(model.fc1, LoraLinear)
    emb = model.emb
    a, b = emb.lora_embedding_A["default"], emb.lora_embedding_B["default"]
    assert a.shape == (2, 20) and b.shape == (8, 2)
    expected = emb.base_layer.weight[x] + (b @ a).T[x]
    torch.testing.assert_close(emb(x), expected)
    out = model(x)
    merge(model)
    torch.testing.assert_close(model(x), out, rtol=1e-6, atol=1e-6)


def test_float32_adapters_on_bfloat16_base(tokens):
    model = tiny_llama(dtype=torch.bfloat16)
    add_lora(model, LoraConfig(r=4, targets="all-linear", init="random"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    ref = layer.base_layer(x) + (4.0 * (x.float() @ layer.lora_A["default"].weight.T)
                                 @ layer.lora_B["default"].weight.T).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32


def test_every_configurable_init_has_an_initialiser():
    from lorakit.config import INIT_MODES
    from lorakit.layer import LINEAR_INITS

    assert tuple(LINEAR_INITS) == INIT_MODES
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5))
    for init in INIT_MODES:
        layer.add_adapter(init, 3, 1.0, 0.0, init, torch.float32, torch.device("cpu"))
    a, b = layer.lora_A["gaussian"].weight, layer.lora_B
    assert torch.equal(b["default"].weight, torch.zeros(5, 3)) and torch.equal(b["gaussian"].weight, torch.zeros(5, 3))
    assert b["random"].weight.abs().min() > 0 and a.std().item() == pytest.approx(1 / 3, rel=0.5)
