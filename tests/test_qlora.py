"""QLoRA: LoRA on NF4 base weights (Dettmers et al. 2023)."""

import copy

import pytest
import torch
from conftest import tiny_llama
from test_inject import logits, randomize_adapters
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



def qlora_loss_and_grads(tokens, checkpointing: bool, dropout: float, dora: bool, fused: bool):
    """Loss and adapter gradients of one QLoRA forward/backward in training mode, optionally
    with non-reentrant activation checkpointing (what train.gradient_checkpointing turns on)."""
    from lorakit.layer import LoraLinear

    q, _ = quantized_and_dequantized()
    add_lora(q, LoraConfig(r=4, alpha=8, dropout=dropout, targets="all-linear", dora=dora))
    randomize_adapters(q)
    for module in q.modules():
        if isinstance(module, LoraLinear):
            module.fused = fused
    q.train()
    if checkpointing:
        q.activation_checkpointing_enable({"use_reentrant": False})
    torch.manual_seed(7)  # the dropout sample; checkpointing restores the RNG state for its recompute
    loss = q(tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in q.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout, dora, fused", [(0.0, False, True), (0.1, False, True), (0.0, True, True),
                                                  (0.1, True, True), (0.1, False, False)])
def test_qlora_with_activation_checkpointing_equals_without(tokens, dropout, dora, fused):
    # Non-reentrant checkpointing lets backward unpack each saved tensor once; the 4-bit linear's
    # backward used to unpack its saved state twice (CheckpointError: "Unpack is being triggered
    # for a tensor that was already unpacked once").
    loss, grads = qlora_loss_and_grads(tokens, False, dropout, dora, fused)
    loss_ckpt, grads_ckpt = qlora_loss_and_grads(tokens, True, dropout, dora, fused)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert len(grads) == len(grads_ckpt) == 14 * (3 if dora else 2)  # A, B (and m) of 14 layers
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=0, atol=1e-6, msg=name)


def test_qdora_with_dropout_fused_equals_the_equation(tokens):
    # the same dropout sample on both paths: base(x - h) + g ⊙ (W h + scale · B A h) on the 4-bit
    # base against W x + b + (g - 1) ⊙ W h + g ⊙ scale · B A h
    (loss, grads), (loss_plain, grads_plain) = (qlora_loss_and_grads(tokens, False, 0.1, True, fused)
                                                for fused in (True, False))
    torch.testing.assert_close(loss, loss_plain, rtol=1e-6, atol=0)
    assert len(grads) == 14 * 3
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_plain[name], rtol=1e-5, atol=1e-7, msg=name)


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



def test_memory_report_counts_nf4_expert_weights_as_4bit_bytes():
    from test_inject import MIXTRAL_EXPERT_WEIGHTS, qlora_mixtral

    q = qlora_mixtral()
    add_lora(q, LoraConfig(r=4, targets=["q_proj"]))
    report = memory_report(q)
    linear_weights = 2 * (32 * 32 + 16 * 32 + 16 * 32 + 32 * 32)  # q, k, v, o of 2 layers
    assert (MIXTRAL_EXPERT_WEIGHTS, linear_weights) == (49_152, 6_144)
    assert report["quantized_weights"] == (MIXTRAL_EXPERT_WEIGHTS + linear_weights) // 2 == 27_648
    # per weight: a uint8 absmax code per 64-block, one float32 nested absmax (< 256 blocks each),
    # the float32 offset, the 16-entry NF4 and 256-entry DQ code tables (float32); 4 experts + 8 linears
    blocks = (MIXTRAL_EXPERT_WEIGHTS + linear_weights) // 64
    assert report["quantization_constants"] == blocks + 12 * (4 + 4 + 4 * 16 + 4 * 256) == 14_016
    assert report["adapters"] == 2 * 4 * (32 + 32) * 4  # q_proj of 2 layers, r=4, float32
    rotary = sum(b.numel() * b.element_size() for b in q.model.rotary_emb.buffers())
    assert report["other"] == 4 * (61_856 - MIXTRAL_EXPERT_WEIGHTS - linear_weights) + rotary
    assert report["total"] == sum(v for k, v in report.items() if k != "total")

# --- GPT-2: transformers' Conv1D (weight stored (in, out)) is quantized as bitsandbytes does ---------

def gpt2_quantized_and_dequantized():
    """A tiny GPT-2 with NF4 layers, and the same GPT-2 whose Conv1D layers hold the dequantized
    NF4 weights, transposed back to Conv1D's (in, out) layout (the reference QLoRA must equal)."""
    from conftest import tiny_gpt2

    q = quantize_linears(tiny_gpt2(), skip={"lm_head"})
    d = tiny_gpt2()
    with torch.no_grad():
        for name, module in q.named_modules():
            if isinstance(module, NF4Linear):
                d.get_submodule(name).weight.copy_(module.dequantize_weight(torch.float32).T)
    return q, d


def test_gpt2_conv1d_layers_are_nf4_and_compute_as_conv1d(tokens):
    from conftest import tiny_gpt2
    from transformers.pytorch_utils import Conv1D

    from lorakit.nf4 import quantize_nf4

    original = tiny_gpt2()
    q, d = gpt2_quantized_and_dequantized()
    layers = {n: m for n, m in q.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj per block
    assert not any(isinstance(m, Conv1D) for m in q.modules())
    for name, layer in layers.items():
        conv = original.get_submodule(name)
        assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == tuple(conv.weight.shape)
        # NF4 of the transposed weight, (out, in) as nn.Linear and bitsandbytes' Linear4bit store it
        assert torch.equal(layer.weight, quantize_nf4(conv.weight.detach().T.contiguous()).packed)
    assert (logits(q, tokens) - logits(original, tokens)).abs().max() > 1e-3  # really quantized
    torch.testing.assert_close(logits(q, tokens), logits(d, tokens), rtol=0, atol=1e-6)


def test_gpt2_qlora_equals_lora_on_the_dequantized_weights_and_trains_only_adapters(tokens):
    q, d = gpt2_quantized_and_dequantized()
    config = LoraConfig(r=4, alpha=8, targets="all-linear")
    add_lora(q, config)
    add_lora(d, config)
    randomize_adapters(q)
    randomize_adapters(d)
    torch.testing.assert_close(logits(q, tokens), logits(d, tokens), rtol=1e-5, atol=1e-5)

    frozen = {k: v.clone() for k, v in q.state_dict().items() if ".lora_" not in k}
    for model in (q, d):  # the same dropout masks in both (GPT-2 drops out attention and residuals)
        torch.manual_seed(0)
        model.train()(tokens, labels=tokens).loss.backward()
    with_grad = sorted(n for n, p in q.named_parameters() if p.grad is not None)
    assert len(with_grad) == 2 * 8 and all(".lora_A." in n or ".lora_B." in n for n in with_grad)
    a_q = q.transformer.h[1].mlp.c_proj.lora_A["default"].weight.grad
    a_d = d.transformer.h[1].mlp.c_proj.lora_A["default"].weight.grad
    torch.testing.assert_close(a_q, a_d, rtol=1e-4, atol=1e-6)
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    assert all(torch.equal(q.state_dict()[k], v) for k, v in frozen.items())  # 4-bit state, biases, ...


def test_gpt2_qlora_merges_back_into_a_plain_gpt2(tmp_path, tokens):
    from conftest import tiny_gpt2
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    q, _ = gpt2_quantized_and_dequantized()
    add_lora(q, LoraConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(q)
    expected = logits(q, tokens)
    merged = merge_and_unload(copy.deepcopy(q))
    layer = merged.transformer.h[0].attn.c_attn
    assert type(layer) is Conv1D and tuple(layer.weight.shape) == (32, 96)  # GPT-2's (in, out) again
    lora = q.transformer.h[0].attn.c_attn
    w = lora.base_layer.dequantize_weight(torch.float32) + 2 * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    torch.testing.assert_close(layer.weight, w.T, rtol=0, atol=1e-6)  # W = deq(W_nf4) + scale B A, transposed
    torch.testing.assert_close(logits(merged, tokens), expected, rtol=1e-5, atol=1e-5)
    plain = {k: tuple(v.shape) for k, v in tiny_gpt2().state_dict().items()}
    assert {k: tuple(v.shape) for k, v in merged.state_dict().items()} == plain
    merged.save_pretrained(tmp_path)  # a checkpoint transformers' GPT-2 loads as it is
    torch.testing.assert_close(logits(GPT2LMHeadModel.from_pretrained(tmp_path), tokens), expected,
                               rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="merged 8 layers back into NF4"):
        requantized = merge_and_unload(copy.deepcopy(q), requantize=True)
    layer = requantized.transformer.h[0].attn.c_attn
    assert isinstance(layer, NF4Linear) and layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (32, 96)
    assert torch.equal(layer.weight, NF4Linear.from_linear(merged.transformer.h[0].attn.c_attn).weight)


def test_gpt2_qlora_adapter_says_fan_in_fan_out_and_loads_on_the_full_precision_base(tmp_path, tokens):
    import json

    from lorakit import load_adapter, save_adapter

    q, d = gpt2_quantized_and_dequantized()
    add_lora(q, LoraConfig(r=4, alpha=8, targets=["c_attn", "c_fc"]))
    randomize_adapters(q)
    save_adapter(q, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    load_adapter(d, tmp_path)
    torch.testing.assert_close(logits(d, tokens), logits(q, tokens), rtol=1e-5, atol=1e-5)


def test_gpt2_4bit_checkpoints_are_laid_out_as_transformers_bitsandbytes_write_them(tmp_path, tokens):
    """Streaming a GPT-2 checkpoint in NF4 gives the layers quantize_linears gives; lorakit's saved
    4-bit GPT-2 equals, key for key and byte for byte, the one transformers + bitsandbytes save
    (Linear4bit with the transposed Conv1D weight); each loads the other's."""
    pytest.importorskip("bitsandbytes")
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

    from lorakit.models import CheckpointLoader, load_quantized, save_model

    def gpt2():
        # n_embd=64: bitsandbytes 0.50's CPU dequantize_4bit is wrong for weights whose rows are
        # not a multiple of the blocksize (64) long, e.g. tiny_gpt2's (96, 32) c_attn (bnb's own
        # quantize-dequantize round trip is off by ~0.03 there; its packed bytes are right)
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=1, eos_token_id=2)).eval()

    gpt2().save_pretrained(tmp_path / "fp32")
    streamed = load_quantized(tmp_path / "fp32")
    in_memory = quantize_linears(gpt2(), skip={"lm_head"})
    assert sum(isinstance(m, NF4Linear) for m in streamed.modules()) == 8
    for name, layer in in_memory.named_modules():
        if isinstance(layer, NF4Linear):
            assert streamed.get_submodule(name).fan_in_fan_out
            assert torch.equal(streamed.get_submodule(name).weight, layer.weight), name
    assert torch.equal(logits(streamed, tokens), logits(in_memory, tokens))

    save_model(streamed, None, tmp_path / "ours")
    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=bnb_config, device_map="cpu")
    assert type(theirs.transformer.h[0].attn.c_attn).__name__ == "Linear4bit"
    theirs.save_pretrained(tmp_path / "bnb")
    # bitsandbytes' dequantized weights (read before any forward: on the CPU its first forward
    # repacks them) are lorakit's, transposed from the Conv1D's (in, out)
    from bitsandbytes.functional import dequantize_4bit

    for name, layer in streamed.named_modules():
        if isinstance(layer, NF4Linear):
            bnb_weight = theirs.get_submodule(name).weight
            w = dequantize_4bit(bnb_weight.data, bnb_weight.quant_state)
            assert w.shape == (layer.out_features, layer.in_features)
            assert torch.equal(layer.dequantize_weight(torch.float32), w), name

    def read(path):
        with safe_open(path / "model.safetensors", "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ours_saved, bnb_saved = read(tmp_path / "ours"), read(tmp_path / "bnb")
    assert ours_saved.keys() == bnb_saved.keys() and len([k for k in ours_saved if k.endswith("absmax")]) == 8 * 2
    for key in ours_saved:  # packed weights, absmaxes, code tables and quant-state JSON (shape [out, in])
        assert ours_saved[key].dtype == bnb_saved[key].dtype and torch.equal(ours_saved[key], bnb_saved[key]), key

    loader = CheckpointLoader(tmp_path / "bnb")  # bitsandbytes' checkpoint, taken byte for byte
    loader.fill()
    assert torch.equal(logits(loader.model.eval(), tokens), logits(streamed, tokens))
    # transformers + bitsandbytes load lorakit's checkpoint as their own (their CPU 4-bit matmul
    # differs from x @ dequantize(W).T by ~1e-2, so bnb is compared with bnb)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu")
    assert type(back.transformer.h[1].mlp.c_proj).__name__ == "Linear4bit"
    assert torch.equal(logits(back, tokens), logits(theirs, tokens))


@pytest.mark.parametrize("fused", [True, False])
def test_a_step_dequantizes_each_4bit_weight_once_in_forward_once_in_backward(tokens, monkeypatch, fused):
    """Each of the 14 4-bit weights is dequantized once in forward and once in backward for dL/dx
    (the dequantized weight is never kept), except layer 0's q, k and v, whose input (the normed
    embeddings) needs no gradient: 14 + 11 per step, with the base and the adapter in one function
    (fused) as with the modules as written."""
    import lorakit.fused
    import lorakit.nf4
    from lorakit.layer import LoraLinear

    q, _ = quantized_and_dequantized()
    add_lora(q, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear"))
    for module in q.modules():
        if isinstance(module, LoraLinear):
            module.fused = fused
    q.train()
    calls = []
    for module in (lorakit.fused, lorakit.nf4):
        monkeypatch.setattr(module, "dequantize", lambda *args, f=module.dequantize: calls.append(1) or f(*args))
    loss = q(tokens, labels=tokens).loss
    assert len(calls) == 14
    loss.backward()
    assert len(calls) == 14 + 11
