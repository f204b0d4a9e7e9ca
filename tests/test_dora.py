"""DoRA (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ||W + ΔW||, the norm a constant in backward.

The layer's forward as the equation with hand-set weights; peft parity both ways (logits 1e-5) on
Llama (nn.Linear), GPT-2 (Conv1D) and an embedding; the loss curve of a few SGD steps equal to
peft's (1e-5 relative); QDoRA on a 4-bit base equal to DoRA on its dequantized weights; merge equal
to the unmerged forward and unmerge restoring W; the fused path equal to the equation.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from safetensors import safe_open
from test_qlora import quantized_and_dequantized
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, add_lora, merge, unmerge
from lorakit.adapter_io import load_adapter, save_adapter
from lorakit.inject import lora_layers, merge_and_unload
from lorakit.layer import LoraLinear

peft = pytest.importorskip("peft")

LLAMA = ["q_proj", "v_proj", "down_proj"]


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def randomize(model, seed=0):
    """Non-zero B and magnitudes away from the norm (g != 1), so that every term of DoRA counts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                if "magnitude" in name:
                    p.mul_(0.5 + torch.rand(p.shape, generator=g))
                else:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_forward_is_the_dora_equation_with_hand_set_weights():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
        layer.bias.copy_(torch.tensor([1.0, -1.0]))
    model = nn.Sequential(layer)
    add_lora(model, LoraConfig(r=1, alpha=1, targets=["0"], dora=True))
    lora = model[0]
    # B = 0 at the start: m = ||W|| row by row = [3, 1], g = 1: the model is the base
    assert lora.lora_magnitude_vector["default"].tolist() == [3.0, 1.0]
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(torch.tensor([[0.0, 1.0]]))
        lora.lora_B["default"].weight.copy_(torch.tensor([[4.0], [0.0]]))
        lora.lora_magnitude_vector["default"].copy_(torch.tensor([10.0, 2.0]))
    # W + ΔW = [[3, 4], [0, 1]], row norms [5, 1]; W' = [10/5 · [3, 4], 2/1 · [0, 1]] = [[6, 8], [0, 2]]
    x = torch.tensor([[1.0, 1.0]])
    assert model(x).tolist() == [[6 + 8 + 1.0, 2 - 1.0]]
    lora.fused = False
    assert model(x).tolist() == [[15.0, 1.0]]


@pytest.mark.parametrize("make", [lambda: nn.Linear(48, 24), lambda: Conv1D(24, 48)], ids=["linear", "conv1d"])
def test_the_norm_without_forming_w_plus_delta_w_equals_it(make):
    """weight_norm's expansion ||W||² + 2s B·(W Aᵀ) + s² B (A Aᵀ) Bᵀ per output equals the norm of
    the formed W + s B A (1e-6 relative), in Linear's (out, in) and Conv1D's (in, out) layouts."""
    torch.manual_seed(0)
    model = nn.Sequential(make())
    add_lora(model, LoraConfig(r=4, alpha=12, targets=["0"], dora=True, init="random"))
    lora = model[0]
    with torch.no_grad():
        lora.lora_B["default"].weight.normal_()  # ΔW of the size of W: the cross term counts
    formed = lora.delta_weight("default") + lora.base_layer.weight
    expected = torch.linalg.vector_norm(formed.double(), dim=lora.norm_dim)
    assert expected.shape == (24,)
    torch.testing.assert_close(lora.weight_norm("default").double(), expected, rtol=1e-6, atol=0)


def test_the_norm_is_a_constant_in_backward():
    # d/dm of g ⊙ (W + ΔW) x with g = m / n: (W + ΔW) x / n; and dL/dB as if n did not depend on B
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    add_lora(model, LoraConfig(r=2, alpha=2, targets=["0"], dora=True, init="random"))
    layer = model[0]
    x = torch.randn(5, 4)
    a, b, m = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.lora_magnitude_vector["default"]
    w = layer.base_layer.weight
    n = (w + b @ a).detach().norm(dim=1)
    (model(x) ** 2).sum().backward()
    grads = [t.grad.clone() for t in (a, b, m)]
    for t in (a, b, m):
        t.grad = None
    ((F.linear(x, (m / n)[:, None] * (w + b @ a))) ** 2).sum().backward()
    for ours, ref in zip(grads, (a.grad, b.grad, m.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def peft_dora(targets, **kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False, **kw)


@pytest.mark.parametrize("make, targets", [(tiny_llama, LLAMA), (tiny_gpt2, ["c_attn", "c_proj"]),
                                           (tiny_llama, ["embed_tokens", "q_proj"])])
def test_lorakit_dora_adapter_loads_in_peft_with_the_same_logits(make, targets, tokens, tmp_path):
    model = make()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=targets, dora=True))
    randomize(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    # peft's state dict names the same tensors (magnitude keys without ".weight")
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    # (peft also saves an adapted embedding's base weight: save_embedding_layers)
    peft_keys = {k for k in peft.get_peft_model_state_dict(theirs) if not k.endswith("embed_tokens.base_layer.weight")}
    assert keys == peft_keys
    magnitudes = sorted(k for k in keys if k.endswith("lora_magnitude_vector"))
    # Llama: 2 layers x (q, v, down); GPT-2: 2 x (c_attn, attn.c_proj, mlp.c_proj); embedding + 2 q_proj
    assert len(magnitudes) == (3 if "embed_tokens" in targets else 6)
    torch.testing.assert_close(logits(theirs, tokens), logits(model, tokens), rtol=1e-5, atol=1e-5)
    assert (logits(model, tokens) - logits(make(), tokens)).abs().max() > 1e-2  # the adapter does something


@pytest.mark.parametrize("make, targets", [(tiny_llama, LLAMA), (tiny_gpt2, ["c_attn", "c_proj"]),
                                           (tiny_llama, ["embed_tokens", "q_proj"])])
def test_peft_dora_adapter_loads_in_lorakit_with_the_same_logits(make, targets, tokens, tmp_path):
    theirs = peft.get_peft_model(make(), peft_dora(targets))
    randomize(theirs, seed=1)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(make(), tmp_path)
    assert sum(isinstance(m, LoraLinear) and "default" in m.lora_magnitude_vector for m in ours.modules()) > 0
    torch.testing.assert_close(logits(ours, tokens), logits(theirs, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_sgd_steps_give_peft_dora_losses(fused, tokens):
    # The same start (peft's adapter copied into lorakit), 5 SGD steps each: loss curves within 1e-5
    theirs = peft.get_peft_model(tiny_llama(), peft_dora(LLAMA))
    randomize(theirs, seed=2)
    ours = tiny_llama()
    add_lora(ours, LoraConfig(r=4, alpha=8, targets=LLAMA, dora=True))
    ours_params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").replace(".default", "")
                key = key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector.default")
                key = key.replace("lora_A.weight", "lora_A.default.weight").replace("lora_B.weight", "lora_B.default.weight")
                ours_params[key].copy_(p)
    for _, layer in lora_layers(ours):
        layer.fused = fused
    curves = []
    for model in (theirs, ours):
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.5)
        losses = []
        for _ in range(5):
            loss = model(tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves.append(losses)
    assert len([p for p in ours.parameters() if p.requires_grad]) == 3 * 2 * 2 + 6
    assert curves[0][-1] < curves[0][0] - 0.05  # it learns
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_dora_equals_the_equation_loss_and_gradients(tokens, dropout):
    # with dropout: the same sample (same seed, drawn in the same order), base(x - h) + g ⊙ (W h +
    # scale · B A h) against the equation's W x + b + (g - 1) ⊙ W h + g ⊙ scale · B A h
    losses, grads = [], []
    for fused in (True, False):
        model = tiny_llama()
        add_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", dora=True, dropout=dropout))
        randomize(model)
        for _, layer in lora_layers(model):
            layer.fused = fused
        model.train()
        torch.manual_seed(1)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 14 * 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_dora_with_dropout_applies_the_base_to_the_dropped_input():
    # peft's DoRA with dropout: (g - 1) ⊙ W dropout(x) + g ⊙ scale · B A dropout(x), one sample for
    # both terms (lorakit's fused path: base(x - h) + g ⊙ (W h + scale · B A h), h = dropout(x))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    add_lora(model, LoraConfig(r=2, alpha=2, targets=["0"], dora=True, dropout=0.5, init="random"))
    layer = model[0]
    layer.train()
    x = torch.randn(3, 8)
    torch.manual_seed(5)
    y = model(x)
    torch.manual_seed(5)
    h = layer.lora_dropout["default"](x)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = layer.lora_magnitude_vector["default"] / (w + b @ a).norm(dim=1)
    ref = F.linear(x, w, bias) + (g - 1) * F.linear(h, w) + g * (h @ a.T @ b.T)
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(h, x)


@pytest.mark.parametrize("make, targets", [(tiny_llama, LLAMA), (tiny_gpt2, ["c_attn", "c_proj"]),
                                           (tiny_llama, ["embed_tokens", "q_proj"])])
def test_merge_equals_the_unmerged_forward_and_unmerge_restores_w(make, targets, tokens):
    model = make()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=targets, dora=True))
    randomize(model)
    before = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model)}
    ref = logits(model, tokens)
    merge(model)
    torch.testing.assert_close(logits(model, tokens), ref, rtol=1e-5, atol=1e-5)
    name, layer = next(iter(lora_layers(model)))
    merged_w = layer.base_layer.weight.detach().clone()
    merge(model)  # merging twice is a no-op
    assert torch.equal(layer.base_layer.weight, merged_w)
    # merged weight = g ⊙ (W + ΔW): its rows (or a Conv1D's columns) have norm m
    norms = torch.linalg.vector_norm(merged_w, dim=layer.norm_dim)
    torch.testing.assert_close(norms, layer.lora_magnitude_vector["default"].detach(), rtol=1e-5, atol=1e-6)
    unmerge(model)
    for n, m in lora_layers(model):
        torch.testing.assert_close(m.base_layer.weight, before[n], rtol=0, atol=2e-6)
    torch.testing.assert_close(logits(model, tokens), ref, rtol=1e-5, atol=1e-5)
    plain = merge_and_unload(model)
    torch.testing.assert_close(logits(plain, tokens), ref, rtol=1e-5, atol=1e-5)


def test_qdora_equals_dora_on_the_dequantized_weights_and_peft(tokens, tmp_path):
    q, d = quantized_and_dequantized()
    for model in (q, d):
        add_lora(model, LoraConfig(r=4, alpha=8, targets=LLAMA, dora=True))
        randomize(model)
    # the magnitudes start at ||deq(W)||: the same on both
    layer_q = q.model.layers[0].self_attn.q_proj
    layer_d = d.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer_q.lora_magnitude_vector["default"], layer_d.lora_magnitude_vector["default"])
    torch.testing.assert_close(logits(q, tokens), logits(d, tokens), rtol=1e-5, atol=1e-5)
    # peft's DoRA on the dequantized base reads the same adapter the same way
    save_adapter(q, tmp_path)
    _, fresh = quantized_and_dequantized()
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(logits(theirs, tokens), logits(q, tokens), rtol=1e-5, atol=1e-5)
    # gradients flow to m, A, B through the 4-bit base
    q.train()
    q(tokens, labels=tokens).loss.backward()
    assert layer_q.lora_magnitude_vector["default"].grad.abs().sum() > 0
    # merge_and_unload dequantizes and merges g ⊙ (deq(W) + ΔW)
    ref = logits(q, tokens)
    torch.testing.assert_close(logits(merge_and_unload(q), tokens), ref, rtol=1e-5, atol=1e-5)


def test_dora_is_refused_where_it_cannot_be_combined():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, targets=["q_proj"], dora=True), "a")
    add_lora(model, LoraConfig(r=4, targets=["q_proj"]), "b")
    from lorakit import combine_adapters

    with pytest.raises(ValueError, match=r"combine_adapters: 'a' are DoRA adapters"):
        combine_adapters(model, {"a": 1.0, "b": 1.0}, "c")


def test_inspect_shows_variant_and_initialisation(tmp_path, capsys):
    from lorakit.cli import main

    model = add_lora(tiny_llama(), LoraConfig(r=4, targets=LLAMA, dora=True, init="pissa", pissa_niter=2))
    save_adapter(model, tmp_path / "raw", original_base=False)
    save_adapter(model, tmp_path / "shipped")
    assert main(["inspect", str(tmp_path / "raw"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["variant"], report["init"], report["magnitude_vectors"]) == \
        ("dora", "pissa (randomized SVD, 2 iterations)", 6)
    # per layer: r (in + out) + out for q (32 -> 32), v (32 -> 16), down (64 -> 32)
    assert report["parameters"] == 2 * (4 * (32 + 32) + 32 + 4 * (32 + 16) + 16 + 4 * (64 + 32) + 32)
    assert main(["inspect", str(tmp_path / "shipped")]) == 0
    text = capsys.readouterr().out
    # converted for the original base: a plain-initialised rank-8 DoRA adapter
    assert "  variant                  dora (6 magnitude vectors)\n  initialisation           default\n" in text
    assert "  r                        8\n" in text
