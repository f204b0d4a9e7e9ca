"""The optimised paths give the plain paths' numbers: fused.lora_update vs LoraLinear's modules.
(The chunked loss's tests are in test_loss.py.)"""

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from test_inject import randomize_adapters
from torch import nn

from lorakit import LoraConfig, add_lora, disable_adapters, dropout, merge, set_adapter, unmerge
from lorakit.layer import LoraLinear
from lorakit.nf4 import quantize_linears


def set_fused(model, fused: bool) -> None:
    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.fused = fused


def loss_and_grads(model, tokens, fused: bool, seed: int = 7):
    """Loss and the gradients of everything trainable, with the dropout masks seeded."""
    set_fused(model, fused)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def assert_paths_agree(model, tokens, rtol=1e-5, atol=1e-6):
    model.train()
    loss_f, grads_f = loss_and_grads(model, tokens, fused=True)
    loss_p, grads_p = loss_and_grads(model, tokens, fused=False)
    torch.testing.assert_close(loss_f, loss_p, rtol=rtol, atol=atol)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) > 0
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=rtol, atol=atol, msg=name)
    return loss_f, grads_f


# ---- one layer: output and the gradients of x, A, B ----------------------------------------------

@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])  # bfloat16: float32 adapters
@pytest.mark.parametrize("bias", ["none", "all"])  # all: the base's bias trains
def test_layer_output_and_gradients(dropout, base_dtype, bias, dora):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(24, 20, dtype=base_dtype))
    add_lora(layer, LoraConfig(r=4, alpha=8, dropout=dropout, targets=["0"], init="random", bias=bias, dora=dora))
    layer.train()
    x0 = torch.randn(3, 5, 24, dtype=base_dtype)
    results = []
    for fused in (True, False):
        set_fused(layer, fused)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = layer(x)
        (y.float() * torch.linspace(-1, 1, 20)).sum().backward()
        lora = layer[0]
        results.append((y, x.grad, lora.lora_A["default"].weight.grad, lora.lora_B["default"].weight.grad,
                        lora.base_layer.bias.grad if bias == "all" else torch.zeros(()),
                        lora.lora_magnitude_vector["default"].grad if dora else torch.zeros(())))
    tol = dict(rtol=1e-5, atol=1e-5) if base_dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for fused_t, plain_t in zip(*results):
        assert fused_t.dtype == plain_t.dtype
        torch.testing.assert_close(fused_t, plain_t, **tol)
    if dropout:  # the masks really were the same: a different seed changes the fused output
        set_fused(layer, True)
        torch.manual_seed(2)
        assert not torch.allclose(layer(x0), results[0][0])


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("two_adapters", [False, True])  # the second adapter goes through lora_update
def test_output_can_be_modified_in_place(base_dtype, two_adapters):
    """Models add onto a projection's output in place (Falcon: mlp_output += attention_output):
    the fused output is a tensor of its own, not a view, so autograd accepts that, and the
    gradients equal the plain path's."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(24, 20, dtype=base_dtype))
    add_lora(layer, LoraConfig(r=4, alpha=8, targets=["0"], init="random"))
    if two_adapters:
        add_lora(layer, LoraConfig(r=2, alpha=4, targets=["0"], init="random"), name="second")
        set_adapter(layer, ["default", "second"])
    x0, other = torch.randn(3, 5, 24, dtype=base_dtype), torch.randn(3, 5, 20, dtype=base_dtype)
    results = []
    for fused in (True, False):
        set_fused(layer, fused)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        y = layer(x)
        y += other  # raised "Output 0 of _LoraUpdate is a view and is being modified inplace"
        (y.float() * torch.linspace(-1, 1, 20)).sum().backward()
        lora = layer[0]
        results.append((y, x.grad, lora.lora_A["default"].weight.grad, lora.lora_B["default"].weight.grad))
    tol = dict(rtol=1e-5, atol=1e-5) if base_dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for fused_t, plain_t in zip(*results):
        torch.testing.assert_close(fused_t, plain_t, **tol)



def test_falcon_trains_with_in_place_adds_onto_adapted_outputs():
    """Falcon's parallel block adds the attention output onto the MLP's in place; the fused and
    plain paths give the same loss and gradients."""
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    model = FalconForCausalLM(FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, parallel_attn=True,
                                           new_decoder_architecture=False))
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear", init="random"))
    assert_paths_agree(model, torch.randint(0, 128, (2, 9)))


def test_under_autocast_the_layer_computes_as_the_plain_path():
    """Under torch.autocast (trl's SFTTrainer turns bf16 autocast on by default) autocast picks
    each matrix multiply's dtype, which a custom Function does not follow: the layer takes the
    plain path there, so fused and plain give the same outputs and gradients."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(24, 20))
    add_lora(layer, LoraConfig(r=4, alpha=8, targets=["0"], init="random"))
    x0 = torch.randn(3, 5, 24)
    results = []
    for fused in (True, False):
        set_fused(layer, fused)
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)  # raised "mat1 and mat2 must have the same dtype" on the fused path
        (y.float() * torch.linspace(-1, 1, 20)).sum().backward()
        lora = layer[0]
        results.append((y, x.grad, lora.lora_A["default"].weight.grad, lora.lora_B["default"].weight.grad))
    assert results[0][0].dtype == torch.bfloat16
    for fused_t, plain_t in zip(*results):
        torch.testing.assert_close(fused_t, plain_t, rtol=0, atol=0)

def test_layer_is_the_lora_equation_with_a_hand_set_mask():
    """p = 0.5, scale 2: out = W x + 2 · B A (x ⊙ m / 0.5) for the mask dropout.sample draws."""
    lin = nn.Linear(4, 1, bias=False)
    model = nn.Sequential(lin)
    add_lora(model, LoraConfig(r=1, alpha=2, dropout=0.5, targets=["0"]))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        model[0].lora_A["default"].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        model[0].lora_B["default"].weight.fill_(1.0)
    model.train()
    x = torch.ones(1, 4)
    for seed in range(8):
        torch.manual_seed(seed)
        positions = dropout.sample(4, 0.5, torch.device("cpu"))
        mask = torch.ones(4)
        mask[positions] = 0
        torch.manual_seed(seed)
        expected = 1.0 + 2 * float((torch.tensor([1.0, 2.0, 3.0, 4.0]) * mask).sum()) / 0.5
        assert model(x).item() == pytest.approx(expected)


def test_saves_x_once_and_the_dropped_positions():
    """Three adapters reading the same x (q, k, v): the fused path keeps x once, each adapter's
    dropped positions (8 bytes each, ~10% of the elements at p = 0.1) and its (N, r) product; the
    plain path keeps a dropped copy of x per adapter."""
    torch.manual_seed(0)
    n, d, r = 64, 32, 4
    block = nn.ModuleDict({k: nn.Linear(d, d, bias=False) for k in ("q", "k", "v")})
    add_lora(block, LoraConfig(r=r, dropout=0.1, targets=["q", "k", "v"]))
    block.train()

    def saved_bytes(fused):
        set_fused(block, fused)
        storages = {}
        weights = {p.untyped_storage().data_ptr() for p in block.parameters()}  # alive anyway

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(n, d, requires_grad=True)
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = [block[k](x) for k in ("q", "k", "v")]
        del outs
        return sum(storages.values())

    torch.manual_seed(1)
    dropped = [dropout.sample(n * d, 0.1, torch.device("cpu")).numel() for _ in range(3)]
    assert 0.05 * 3 * n * d < sum(dropped) < 0.15 * 3 * n * d
    assert saved_bytes(True) == n * d * 4 + 8 * sum(dropped) + 3 * n * r * 4
    assert saved_bytes(False) == 3 * n * d * 4 + 8 * sum(dropped) + 3 * n * r * 4


# ---- whole models: loss and gradients, fused vs plain --------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_llama_fp32(tokens, dropout):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear"))
    randomize_adapters(model)
    assert_paths_agree(model, tokens)


def test_llama_bf16_base_fp32_adapters(tokens):
    model = tiny_llama(dtype=torch.bfloat16)
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear"))
    randomize_adapters(model)
    _, grads = assert_paths_agree(model, tokens, rtol=2e-2, atol=2e-3)
    assert all(g.dtype == torch.float32 for g in grads.values())


def test_several_active_adapters_merged_unmerged_disabled(tokens):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear"), name="one")
    add_lora(model, LoraConfig(r=2, alpha=4, dropout=0.2, targets=["q_proj", "v_proj"]), name="two")
    randomize_adapters(model)
    set_adapter(model, ["one", "two"])
    _, grads = assert_paths_agree(model, tokens)
    assert any(".one." in n for n in grads) and any(".two." in n for n in grads)

    merge(model, ["two"])  # "two" is in the weights now; "one" still goes through the adapter path
    _, grads = assert_paths_agree(model, tokens)
    assert any(".one." in n for n in grads) and not any(".two." in n for n in grads)

    unmerge(model)
    model.eval()
    base = tiny_llama()(tokens).logits.detach()
    with disable_adapters(model), torch.no_grad():
        for fused in (True, False):
            set_fused(model, fused)
            torch.testing.assert_close(model(tokens).logits, base, rtol=1e-6, atol=1e-6)


def test_conv1d_fan_in_fan_out(tokens):
    model = tiny_gpt2()
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets=["c_attn", "c_proj", "c_fc"]))
    assert model.transformer.h[0].attn.c_attn.fan_in_fan_out
    randomize_adapters(model)
    assert_paths_agree(model, tokens)


def test_nf4_base(tokens):
    model = quantize_linears(tiny_llama(hidden=64), torch.float32, skip={"lm_head"})
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear"))
    randomize_adapters(model)
    assert_paths_agree(model, tokens, rtol=1e-6, atol=1e-6)


# ---- a 4-bit base: the base and the first adapter in one function ---------------------------------

@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [False, True])
def test_nf4_base_and_adapter_in_one_function(monkeypatch, dropout_p, bias):
    """lora_linear on a 4-bit state equals NF4Linear followed by lora_update (the path before the
    fusion): bit for bit without a bias (the same products, summed as autograd summed them), within
    1e-6 with one (addmm adds it inside the product). It keeps for backward what that path keeps
    (x, the dropped positions, A x and the 4-bit buffers: no dequantized weight) and dequantizes
    once in forward and once in backward, not at all in backward when x needs no gradient."""
    import lorakit.fused as fused_module
    from lorakit.fused import lora_linear, lora_update
    from lorakit.nf4 import NF4Linear

    torch.manual_seed(0)
    n, d_in, d_out, r = 40, 64, 96, 4
    base = NF4Linear.from_linear(nn.Linear(d_in, d_out, bias=bias))
    a, b = torch.randn(r, d_in, requires_grad=True), torch.randn(d_out, r, requires_grad=True)
    x0, weights = torch.randn(2, n // 2, d_in), torch.linspace(-1, 1, d_out)
    kept = {t.untyped_storage().data_ptr() for t in [*base.buffers(), *base.parameters(), a, b]}
    calls = []
    counting = fused_module.dequantize
    monkeypatch.setattr(fused_module, "dequantize", lambda *args: calls.append(1) or counting(*args))

    def run(fused: bool, x_grad: bool = True):
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in kept:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = x0.clone().requires_grad_(x_grad)
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = lora_linear(x, base.quant_state, base.bias, a, b, 2.0, dropout_p) if fused else \
                lora_update(base(x), x, a, b, 2.0, dropout_p)
        calls_forward = len(calls)
        (y * weights).sum().backward()
        grads = [x.grad if x_grad else torch.zeros(()), a.grad, b.grad, base.bias.grad if bias else torch.zeros(())]
        a.grad = b.grad = None
        if bias:
            base.bias.grad = None
        return y.detach(), grads, sum(saved.values()), calls_forward

    y_f, grads_f, saved_f, forward_calls = run(True)
    assert (forward_calls, len(calls)) == (1, 2)
    y_p, grads_p, saved_p, _ = run(False)
    torch.manual_seed(1)
    dropped = dropout.sample(n * d_in, dropout_p, torch.device("cpu")).numel() if dropout_p else 0
    assert saved_f == saved_p == n * d_in * 4 + 8 * dropped + n * r * 4  # x, the dropped positions, A x
    for fused_t, plain_t in zip([y_f, *grads_f], [y_p, *grads_p]):
        if bias:
            torch.testing.assert_close(fused_t, plain_t, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(fused_t, plain_t)
    calls.clear()
    run(True, x_grad=False)
    assert len(calls) == 1  # dL/dx not needed: W is not dequantized again


def test_nf4_base_in_another_dtype_takes_the_layer_as_written():
    """x in another dtype than the 4-bit layer's compute dtype: NF4Linear casts it, so the base
    runs as its own module and the adapter through lora_update; the result is NF4Linear's plus the
    update, as with fused = False."""
    from lorakit.nf4 import NF4Linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    model[0] = NF4Linear.from_linear(model[0], compute_dtype=torch.bfloat16)
    add_lora(model, LoraConfig(r=4, alpha=8, targets=["0"], init="random"))
    assert model[0]._frozen_weight(torch.randn(1, 64)) is None
    assert model[0]._frozen_weight(torch.randn(1, 64, dtype=torch.bfloat16)) is None  # float32 bias
    x = torch.randn(3, 64)
    outs = []
    for fused in (True, False):
        set_fused(model, fused)
        outs.append(model(x))
    assert outs[0].dtype == torch.float32
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_rescale_gives_autograds_product_and_gradients():
    """fused.rescale(z, g) = z ⊙ g with g per output feature (DoRA's m / ||W + ΔW||): the value to
    the bit, and both gradients as autograd's product computes them (dL/dz to the bit; dL/dg summed
    over the tokens in another order, 1e-6), for a (B, T, out) z, and with only one input needing a
    gradient."""
    from lorakit.fused import rescale

    torch.manual_seed(0)
    z, g, grad = torch.randn(2, 5, 7), torch.rand(7) + 0.5, torch.randn(2, 5, 7)
    for need_z, need_g in ((True, True), (True, False), (False, True)):
        mine = [z.clone().requires_grad_(need_z), g.clone().requires_grad_(need_g)]
        theirs = [z.clone().requires_grad_(need_z), g.clone().requires_grad_(need_g)]
        out, reference = rescale(*mine), theirs[0] * theirs[1]
        assert out.equal(reference)
        out.backward(grad)
        reference.backward(grad)
        if need_z:
            assert mine[0].grad.equal(theirs[0].grad)
        if need_g:
            torch.testing.assert_close(mine[1].grad, theirs[1].grad, rtol=1e-6, atol=1e-6)
