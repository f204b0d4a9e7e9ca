"""rms_norm: the Llama-family RMSNorm with its gradient in closed form.

The forward is transformers' to the bit; dL/dx equals autograd's through transformers' operations to
float32 rounding, and both equal a float64 reference; backward keeps the same tensors as autograd's;
which norms it recognises; where it steps aside (a trained norm weight, no gradient); add_lora
switching it on and merge_and_unload off.
"""

import copy

import pytest
import torch
from conftest import tiny_llama

from lorakit import LoraConfig, add_lora, rms_norm
from lorakit import lean as lean_modules
from lorakit.inject import merge_and_unload


def llama_norm(h=48, eps=1e-5, dtype=torch.float32):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(h, eps=eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h, generator=torch.Generator().manual_seed(1)) * 0.5 + 1)
    return norm.requires_grad_(False)


def output_and_input_grad(norm, x, g):
    x = x.clone().requires_grad_(True)
    y = norm(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_transformers_and_backward_its_gradient(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 48, generator=gen) * 3).to(dtype)
    g = torch.randn(3, 7, 48, generator=gen).to(dtype)
    plain = llama_norm(dtype=dtype)
    lean = copy.deepcopy(plain)
    assert rms_norm.make_lean(lean) == 1 and rms_norm.is_lean(lean)
    y, grad = output_and_input_grad(plain, x, g)
    lean_y, lean_grad = output_and_input_grad(lean, x, g)
    assert lean_y.dtype == dtype and torch.equal(lean_y, y)
    # dL/dx from the closed form, in float64: r a - x r³ (a · x) / h, a = g ⊙ w
    x64, a = x.double(), (g.double() * plain.weight.double())
    r = (x64.pow(2).mean(-1, keepdim=True) + plain.variance_epsilon).rsqrt()
    want = r * a - x64 * r.pow(3) * (a * x64).sum(-1, keepdim=True) / x.shape[-1]
    if dtype == torch.float32:
        torch.testing.assert_close(lean_grad, grad, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lean_grad.double(), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-6)
    else:  # both round a = g ⊙ w and the result to bfloat16: at most one bf16 step apart
        assert lean_grad.dtype == torch.bfloat16
        torch.testing.assert_close(lean_grad, grad, rtol=2 ** -7, atol=2 ** -7)
        torch.testing.assert_close(lean_grad.double(), want, rtol=2 ** -6, atol=2 ** -6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_what_autograd_keeps(dtype):
    """x in float32 and r (one per row): the planner's 4h + 4 bytes per token and norm."""
    x = torch.randn(4, 48).to(dtype).requires_grad_(True)

    def saved_bytes(norm):
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            norm(x)
        return sum(sizes.values()) - norm.weight.untyped_storage().nbytes()

    plain = llama_norm(dtype=dtype)
    lean = copy.deepcopy(plain)
    rms_norm.make_lean(lean)
    assert saved_bytes(lean) == saved_bytes(plain) == 4 * 4 * 48 + 4 * 4


def test_which_norms_it_recognises():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    assert all(rms_norm.is_llama_norm(cls(16)) for cls in (MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm))
    assert rms_norm.is_llama_norm(llama_norm())
    assert not rms_norm.is_llama_norm(GemmaRMSNorm(16))  # (1 + w), in float32 throughout
    assert not rms_norm.is_llama_norm(torch.nn.LayerNorm(16))


def test_a_lora_models_loss_and_gradients_are_those_of_its_plain_norms():
    model = add_lora(tiny_llama().train(), LoraConfig(r=4, alpha=8, targets="all-linear", dropout=0.1,
                                                      init="random"))
    assert sum(rms_norm.is_lean(m) for m in model.modules()) == 5  # two per layer, the final norm
    plain = copy.deepcopy(model)
    lean_modules.restore(plain)
    assert not any(lean_modules.is_lean(m) for m in plain.modules())
    tokens = torch.randint(3, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    results = []
    for m in (plain, model):
        torch.manual_seed(1)  # the same dropout draws
        loss = m(tokens, labels=tokens).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (loss, grads), (lean_loss, lean_grads) = results
    assert torch.equal(lean_loss, loss)
    assert grads.keys() == lean_grads.keys() and len(grads) == 28
    for name in grads:
        torch.testing.assert_close(lean_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not any(lean_modules.is_lean(m) for m in merge_and_unload(model).modules())


def test_it_steps_aside_for_a_trained_weight_and_without_gradients():
    lean = llama_norm()
    rms_norm.make_lean(lean)
    calls = []
    original = rms_norm._RMSNorm.apply
    rms_norm._RMSNorm.apply = lambda *a: calls.append(1) or original(*a)
    try:
        x = torch.randn(2, 48, requires_grad=True)
        lean(x)
        with torch.no_grad():
            lean(x)
        lean(x.detach())
        assert len(calls) == 1
        lean.weight.requires_grad_(True)  # autograd's backward: dL/dw needs the normalized input
        plain = copy.deepcopy(lean)
        lean_modules.restore(plain)
        lean(x).sum().backward()
        plain(x).sum().backward()
        assert len(calls) == 1
        assert torch.equal(lean.weight.grad, plain.weight.grad)
    finally:
        rms_norm._RMSNorm.apply = original
