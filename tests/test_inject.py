"""Adapters on models (inject.py): add_lora and its targets, merge / unmerge / merge_and_unload,
several adapters (switch, disable, delete, combine), biases, modules_to_save, trainable counts."""

import math

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

from lorakit import (
    LoraConfig,
    active_adapters,
    add_lora,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unmerge,
)
from lorakit.inject import lora_layers, resolve_targets
from lorakit.layer import LoraLayer, ModulesToSave


def randomize_adapters(model, seed=0):
    """Non-zero B everywhere, so that adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_trainable_parameters_seed_example():
    model = nn.Sequential(nn.Linear(4096, 4096, bias=False))
    report = trainable_parameters(add_lora(model, LoraConfig(r=8, targets=["0"])))
    assert report.trainable == 65_536 == 2 * 8 * 4096
    assert report.adapted == 4096 * 4096 and report.reduction == 256.0
    assert report.per_module == {"0": 65_536}
    assert report.total == 4096 * 4096 + 65_536


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_merge_unmerge_unload_logit_parity(make, tokens):
    model = make()
    base_logits = logits(model, tokens)
    add_lora(model, LoraConfig(r=4, alpha=8, targets="all-linear", init="random"))
    adapted = logits(model, tokens)
    assert (adapted - base_logits).abs().max() > 1e-2  # the adapter does something
    merge(model)
    torch.testing.assert_close(logits(model, tokens), adapted, rtol=1e-5, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(logits(model, tokens), adapted, rtol=1e-5, atol=1e-5)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert "lorakit_adapters" not in plain.__dict__
    torch.testing.assert_close(logits(plain, tokens), adapted, rtol=1e-5, atol=1e-5)


def test_only_adapters_change_after_optimizer_steps(tokens):
    model = tiny_llama()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.1, targets="all-linear"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    now = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert now.keys() == frozen.keys()
    for key, before in frozen.items():
        assert torch.equal(now[key], before), key  # bit-identical
    b = model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert b.abs().sum() > 0


def test_tied_embeddings_survive_merge(tokens):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding_before = model.model.embed_tokens.weight.detach().clone()
    add_lora(model, LoraConfig(r=4, targets=["lm_head", "q_proj"], init="random"))
    adapted = logits(model, tokens)
    merge(model)
    # the embedding keeps its values; only the output head took the delta
    assert torch.equal(model.model.embed_tokens.weight, embedding_before)
    torch.testing.assert_close(logits(model, tokens), adapted, rtol=1e-5, atol=1e-5)
    unmerge(model)  # ties back to the shared original, exactly
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.weight
    plain = merge_and_unload(model)
    assert plain.config.tie_word_embeddings is False
    assert torch.equal(plain.model.embed_tokens.weight, embedding_before)
    torch.testing.assert_close(logits(plain, tokens), adapted, rtol=1e-5, atol=1e-5)


def test_tied_embedding_adapter_does_not_leak_into_head(tokens):
    model = tiny_llama(tie=True)
    head_before = model.lm_head.weight.detach().clone()
    add_lora(model, LoraConfig(r=4, targets=["embed_tokens"]))
    randomize_adapters(model)
    adapted = logits(model, tokens)
    plain = merge_and_unload(model)
    assert torch.equal(plain.lm_head.weight, head_before)
    torch.testing.assert_close(logits(plain, tokens), adapted, rtol=1e-5, atol=1e-5)


def test_several_adapters_switch_disable_delete(tokens):
    model = tiny_llama()
    base = logits(model, tokens)
    add_lora(model, LoraConfig(r=4, targets=["q_proj", "v_proj"], init="random"), "a")
    out_a = logits(model, tokens)
    add_lora(model, LoraConfig(r=2, targets=["o_proj"], init="random"), "b")
    # a new adapter is added inactive and frozen
    assert active_adapters(model) == ["a"]
    torch.testing.assert_close(logits(model, tokens), out_a)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".b." in n)
    set_adapter(model, "b")
    out_b = logits(model, tokens)
    assert not torch.allclose(out_b, out_a)
    assert all(p.requires_grad == (".b." in n) for n, p in model.named_parameters() if ".lora_" in n)
    with disable_adapters(model):
        torch.testing.assert_close(logits(model, tokens), base)
    torch.testing.assert_close(logits(model, tokens), out_b)
    set_adapter(model, ["a", "b"])
    merge(model)
    with disable_adapters(model):  # merged adapters are taken out for the block, then put back
        torch.testing.assert_close(logits(model, tokens), base, rtol=1e-5, atol=1e-5)
    unmerge(model)
    delete_adapter(model, "b")
    torch.testing.assert_close(logits(model, tokens), out_a)
    assert isinstance(model.model.layers[0].self_attn.o_proj, nn.Linear)  # unwrapped again
    with pytest.raises(ValueError, match="no adapter named 'b'; adapters on this model: a"):
        set_adapter(model, "b")
    with pytest.raises(ValueError, match="adapter 'a' already exists"):
        add_lora(model, LoraConfig(), "a")


def _deltas(model, name):
    return {n: layer.delta_weight(name) for n, layer in lora_layers(model) if name in layer.rank}


def test_combine_adapters_is_the_weighted_sum_of_deltas():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init="random"), "a")
    add_lora(model, LoraConfig(r=2, alpha=3, targets=["v_proj", "o_proj"], layers=[1], init="random"), "b")
    combine_adapters(model, {"a": 0.7, "b": -1.5}, "ab")
    da, db, dab = _deltas(model, "a"), _deltas(model, "b"), _deltas(model, "ab")
    assert set(dab) == set(da) | set(db)
    for n in dab:
        expected = 0.7 * da.get(n, 0) + -1.5 * db.get(n, 0)
        torch.testing.assert_close(dab[n], expected, rtol=1e-5, atol=1e-6)
    # concatenated rank: 4 + 2 on the shared layer; zero padding elsewhere
    layer = model.model.layers[1].self_attn.v_proj
    assert layer.rank["ab"] == 6 and layer.scaling["ab"] == 1.0


def test_combine_adapters_svd_is_the_best_low_rank_approximation():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, targets=["q_proj"], init="random"), "a")
    add_lora(model, LoraConfig(r=4, targets=["q_proj"], init="random"), "b")
    combine_adapters(model, {"a": 1.0, "b": 1.0}, "svd", rank=3)
    for n, layer in lora_layers(model):
        full = layer.delta_weight("a") + layer.delta_weight("b")
        s = torch.linalg.svdvals(full)
        err = torch.linalg.matrix_norm(layer.delta_weight("svd") - full)
        # Eckart–Young: the error of the best rank-3 approximation is the norm of the tail
        torch.testing.assert_close(err, s[3:].norm(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="rank=0"):
        combine_adapters(model, {"a": 1.0}, "bad", rank=0)


def test_bias_modes_and_modules_to_save(tokens):
    gpt = tiny_gpt2()
    add_lora(gpt, LoraConfig(targets=["c_attn"], bias="lora_only"))
    trainable = {n for n, p in gpt.named_parameters() if p.requires_grad}
    assert "transformer.h.0.attn.c_attn.base_layer.bias" in trainable
    assert "transformer.h.0.attn.c_proj.bias" not in trainable
    gpt = tiny_gpt2()
    add_lora(gpt, LoraConfig(targets=["c_attn"], bias="all"))
    assert gpt.transformer.h[0].attn.c_proj.bias.requires_grad
    assert not gpt.transformer.h[0].attn.c_proj.weight.requires_grad

    model = tiny_llama()
    head = model.lm_head.weight.detach().clone()
    add_lora(model, LoraConfig(targets=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSave)
    copy = model.lm_head.modules_to_save["default"]
    assert copy.weight.requires_grad and not model.lm_head.original_module.weight.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    assert torch.equal(model.lm_head.original_module.weight, head)
    assert not torch.equal(copy.weight, head)
    with pytest.raises(ValueError, match=r"modules_to_save \['score'\] match no module"):
        add_lora(tiny_llama(), LoraConfig(targets=["q_proj"], modules_to_save=["score"]))


def test_rank_pattern_and_rslora_scaling():
    model = tiny_llama()
    add_lora(model, LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"], rslora=True,
                               rank_pattern={"v_proj": 4}))
    q, v = model.model.layers[0].self_attn.q_proj, model.model.layers[0].self_attn.v_proj
    assert q.rank["default"] == 8 and q.scaling["default"] == pytest.approx(16 / math.sqrt(8))
    assert v.lora_A["default"].weight.shape == (4, 32) and v.scaling["default"] == 8.0


def test_adapters_added_to_a_model_in_eval_mode_do_not_drop_out(tokens):
    model = tiny_llama()  # in eval mode
    add_lora(model, LoraConfig(r=4, dropout=0.5, targets="all-linear", init="random"))
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(logits(model, tokens), logits(model, tokens), rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(tokens).logits, model(tokens).logits)  # dropout on in train mode


def test_targets_and_modules_to_save_that_match_nothing_are_refused_naming_them():
    # (was check_config's test: both problems of one config, each refused by the public path)
    with pytest.raises(ValueError, match=r"targets \['nope'\] match no module; linear modules here: down_proj, "
                                         r"gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj$"):
        resolve_targets(tiny_llama(), LoraConfig(targets=["nope"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match=r"^modules_to_save \['head'\] match no module; leaf modules here: "):
        add_lora(tiny_llama(), LoraConfig(targets=["q_proj"], modules_to_save=["head"]))


# --- mixture-of-experts models (transformers 5: experts are 3-D parameters, not nn.Linear) ---------

MIXTRAL_PARAMETERS = 61_856  # the tiny Mixtral's float parameters
MIXTRAL_EXPERT_WEIGHTS = 2 * (4 * 128 * 32 + 4 * 32 * 64)  # 2 layers x (gate_up_proj + down_proj), 4 experts


def tiny_mixtral():
    from test_architectures import tiny_model

    return tiny_model("mixtral")


def qlora_mixtral():
    """The tiny Mixtral as QLoRA stores it (training.setup's way): its linear layers (head excepted)
    as NF4Linear, its expert weights as NF4Weight parametrizations."""
    from lorakit.nf4 import quantize_linears, quantize_parameter_
    from lorakit.surgery import expert_parameters

    model = quantize_linears(tiny_mixtral(), skip={"lm_head"})
    for module, leaf in expert_parameters(model):
        quantize_parameter_(model.get_submodule(module), leaf)
    return model


def test_all_linear_on_a_mixture_of_experts_model_warns_about_the_experts_left_out():
    import warnings

    model = tiny_mixtral()
    with pytest.warns(UserWarning) as record:
        add_lora(model, LoraConfig(r=4, targets="all-linear"))
    moe = [w for w in record if "mixture-of-experts" in str(w.message)]
    assert [str(w.message) for w in moe] == [
        "all-linear adapts the linear layers only; 4 mixture-of-experts weights are not adapted "
        "(model.layers.0.mlp.experts.gate_up_proj, model.layers.0.mlp.experts.down_proj, "
        "model.layers.1.mlp.experts.gate_up_proj, ...); to adapt them too, set lora.target_parameters "
        "(LoraConfig(target_parameters=...), peft's), e.g. ['experts.gate_up_proj', 'experts.down_proj']"]
    assert moe[0].filename == __file__  # stacklevel: the caller of add_lora
    with pytest.warns(UserWarning, match=r"; 2 mixture-of-experts weights are not adapted \(model\.layers\.1\.mlp"
                                         r"\.experts\.gate_up_proj, model\.layers\.1\.mlp\.experts\.down_proj\);"):
        add_lora(tiny_mixtral(), LoraConfig(r=4, targets="all-linear", layers=[1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dense model, or an explicit target list: no warning
        add_lora(tiny_llama(), LoraConfig(r=4, targets="all-linear"))
        add_lora(tiny_mixtral(), LoraConfig(r=4, targets=["q_proj"]))


def test_qlora_mixture_of_experts_total_counts_the_nf4_expert_weights():
    from lorakit.nf4 import nf4_weights

    assert sum(p.numel() for p in tiny_mixtral().parameters()) == MIXTRAL_PARAMETERS
    q = qlora_mixtral()
    assert sum(s.numel for n, s in nf4_weights(q).items() if not n.endswith(".weight")) == MIXTRAL_EXPERT_WEIGHTS
    assert trainable_parameters(q).total == MIXTRAL_PARAMETERS  # as the float model: 4-bit weights count unpacked
    with pytest.warns(UserWarning, match="mixture-of-experts"):
        add_lora(q, LoraConfig(r=4, targets="all-linear"))
    report = trainable_parameters(q)
    assert report.trainable == 2 * 4 * (64 + 48 + 48 + 64) == 1_792  # r (in + out) of q, k, v, o in 2 layers
    assert report.total == MIXTRAL_PARAMETERS + 1_792
