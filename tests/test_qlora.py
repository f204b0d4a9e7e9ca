"""QLoRA: LoRA on NF4 base weights (Dettmers et al. 2023)."""

import copy

import pytest
import torch
from conftest import tiny_llama
from test_lora import logits, randomize_adapters
from torch import nn

from lorakit import LoraConfig, add_lora, merge, merge_and_unload, trainable_parameters
from lorakit.inject import memory_report
from lorakit.nf4 import NF4Linear, quantize_linears


def quantized_and_dequantized(hidden=64, compute_dtype=torch.float32):
    """The same tiny model twice: with NF4 linear layers, and with nn.Linear layers holding the
    dequantized NF4 weights (the reference QLoRA must equal)."""
    q = quantize_linears(tiny_llama(hidden=hidden), compute_dtype, skip={"lm_head"})
    d = tiny_llama(hidden=hidden)
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, NF4Linear):
                d.get_submodule(name).weight.copy_(module.dequantize_weight(torch.float32))
    return q, d


def test_quantize_linears_skips_the_head_and_embeddings():
    q, _ = quantized_and_dequantized()
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if isinstance(m, (nn.Linear, NF4Linear, nn.Embedding))}
    assert kinds["lm_head"] == "Linear" and kinds["model.embed_tokens"] == "Embedding"
    assert sum(k == "NF4Linear" for k in kinds.values()) == 14


def test_qlora_equals_lora_on_the_dequantized_weights(tokens):
    q, d = quantized_and_dequantized()
    config = LoraConfig(r=4, alpha=8, targets="all-linear")
    add_lora(q, config)
    add_lora(d, config)
    randomize_adapters(q)
    randomize_adapters(d)
    out_q, out_d = logits(q, tokens), logits(d, tokens)
    assert (out_q - logits(tiny_llama(hidden=64), tokens)).abs().max() > 1e-2
    torch.testing.assert_close(out_q, out_d, rtol=1e-5, atol=1e-5)
    # gradients of the adapters agree too
    q(tokens, labels=tokens).loss.backward()
    d(tokens, labels=tokens).loss.backward()
    gq = q.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
    gd = d.model.layers[1].mlp.down_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(gq, gd, rtol=1e-4, atol=1e-6)


def test_training_steps_change_only_adapters(tokens):
    q, _ = quantized_and_dequantized()
    add_lora(q, LoraConfig(r=4, targets="all-linear"))
    frozen = {k: v.clone() for k, v in q.state_dict().items() if ".lora_" not in k}
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    q.train()
    for _ in range(2):
        q(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    after = q.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # packed bytes, absmax, ... identical
    assert q.model.layers[0].self_attn.q_proj.lora_B["default"].weight.abs().sum() > 0
    report = trainable_parameters(q)
    # r (in + out) per adapted layer
    assert report.trainable == 4 * sum(m.in_features + m.out_features for m in q.modules() if isinstance(m, NF4Linear))
    assert report.adapted == sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, NF4Linear))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_merge_into_a_16_32_bit_model_matches_the_adapter(tokens, dtype, tol):
    q, _ = quantized_and_dequantized()
    add_lora(q, LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(q)
    expected = logits(q, tokens)
    with pytest.raises(ValueError, match="cannot merge into a 4-bit weight in place"):
        merge(q)
    plain = merge_and_unload(q, dtype=dtype)
    assert not any(isinstance(m, NF4Linear) for m in plain.modules())
    layer = plain.model.layers[0].self_attn.q_proj
    assert type(layer) is nn.Linear and layer.weight.dtype == dtype
    torch.testing.assert_close(logits(plain.to(dtype), tokens).float(), expected, rtol=tol, atol=tol)


def test_merge_back_into_nf4_is_explicit_and_reports_its_error(tokens):
    q, _ = quantized_and_dequantized()
    add_lora(q, LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(q)
    exact = copy.deepcopy(q)
    expected = logits(q, tokens)
    with pytest.warns(UserWarning, match=r"merged 14 layers back into NF4: relative weight error mean 0\.0[5-9]"):
        requantized = merge_and_unload(q, requantize=True)
    assert sum(isinstance(m, NF4Linear) for m in requantized.modules()) == 14
    exact_plain = merge_and_unload(exact)
    err = (logits(requantized, tokens) - expected).abs().max()
    assert err > 1e-3  # lossy...
    assert (logits(exact_plain, tokens) - expected).abs().max() < 1e-5  # ...unlike the default merge


def test_memory_report_counts_4bit_bytes():
    q, _ = quantized_and_dequantized(hidden=64)
    add_lora(q, LoraConfig(r=4, targets=["q_proj"]))
    report = memory_report(q)
    n4 = sum(m.in_features * m.out_features for m in q.modules() if isinstance(m, NF4Linear))
    assert report["quantized_weights"] == n4 // 2
    assert report["adapters"] == 2 * 4 * (64 + 64) * 4  # 2 layers, r=4, float32
    n_blocks = sum(-(-m.in_features * m.out_features // 64) for m in q.modules() if isinstance(m, NF4Linear))
    consts = report["quantization_constants"]
    # per layer: uint8 absmax per block, float32 nested absmax per 256 blocks, offset, 16 + 256 code floats
    assert consts == n_blocks + sum(4 * (-(-(-(-m.in_features * m.out_features // 64)) // 256)) + 4 + 4 * 16 + 4 * 256
                                    for m in q.modules() if isinstance(m, NF4Linear))
    assert report["total"] == sum(v for k, v in report.items() if k != "total")
