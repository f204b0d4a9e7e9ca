"""Where lorakit's adapter bookkeeping meets peft's: peft's own multi-adapter cases, run on both.

Each test builds the same adapters in peft 0.21 and in lorakit (peft's files loaded by lorakit) and
compares what a user sees: which adapters are active, what trains, the logits, the refusals. Where
lorakit deliberately differs, the test pins lorakit's behaviour and says why.
"""

import json
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from safetensors import safe_open

import lorakit
from lorakit import (
    LoraConfig,
    active_adapters,
    add_lora,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    set_adapter,
    trainable_parameters,
)
from lorakit.adapter_io import load_adapter, save_adapter
from lorakit.layer import LoraLayer, ModulesToSave

peft = pytest.importorskip("peft")


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def peft_model(make, adapters):
    """A peft model with the named adapters {name: peft.LoraConfig}, the first one active."""
    (first, config), *rest = adapters.items()
    model = peft.get_peft_model(make(), config, adapter_name=first)
    for name, config in rest:
        model.add_adapter(name, config)
    return model


def peft_to_lorakit(model, make, tmp_path):
    """The same adapters, saved by peft and loaded by lorakit in the same order (first active)."""
    ours = make()
    for name in model.peft_config:
        model.save_pretrained(tmp_path / "peft", selected_adapters=[name])
        directory = tmp_path / "peft" if name == "default" else tmp_path / "peft" / name
        load_adapter(ours, directory, name)
    return ours


def peft_lora(**kwargs):
    return peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)


# --- aLoRA -----------------------------------------------------------------------------------------


def test_alora_adapter_is_refused_by_load_and_inspect(tmp_path):
    # aLoRA applies the adapter only from the invocation tokens on: loaded as plain LoRA it would
    # change every position (logits off by ~0.5 on a small Llama), so lorakit refuses it.
    model = peft.get_peft_model(tiny_llama(), peft_lora(target_modules=["q_proj", "v_proj"],
                                                        alora_invocation_tokens=[5, 6], task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alora_invocation_tokens"] == [5, 6]
    ours = tiny_llama()
    with pytest.raises(ValueError, match=r"alora_invocation_tokens=\[5, 6\]: activated LoRA \(aLoRA\) is not "
                                         r"supported by lorakit \(only plain LoRA\)"):
        load_adapter(ours, tmp_path)
    assert not any(isinstance(m, LoraLayer) for m in ours.modules())
    assert lorakit.inject.adapter_configs(ours) == {}
    result = subprocess.run([sys.executable, "-m", "lorakit", "inspect", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("lorakit inspect: error: invalid adapter_config.json:\n"
                                    "  - alora_invocation_tokens=[5, 6]: activated LoRA (aLoRA)")


# --- biases ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("first, second", [("all", "none"), ("none", "lora_only"), ("lora_only", "all")])
def test_an_adapter_that_trains_biases_is_the_only_adapter(first, second):
    # Biases are base weights shared by every adapter: an adapter that trains them cannot be scoped
    # (peft refuses two such adapters; lorakit refuses any second adapter next to one).
    model = tiny_gpt2()
    add_lora(model, LoraConfig(r=4, targets=["c_attn"], bias=first), "a")
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer = "a" if first != "none" else "b"
    mode = first if first != "none" else second
    with pytest.raises(ValueError, match=f"cannot add adapter 'b': adapter {trainer!r} trains biases "
                                         f"\\(bias={mode!r}\\), which are base weights shared by every adapter"):
        add_lora(model, LoraConfig(r=4, targets=["c_attn"], bias=second), "b")
    assert list(lorakit.inject.adapter_configs(model)) == ["a"]
    assert all("b" not in layer.rank for _, layer in lorakit.inject.lora_layers(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    if "none" not in (first, second):  # peft refuses this pair too
        other = peft_model(tiny_gpt2, {"a": peft_lora(target_modules=["c_attn"], bias=first)})
        with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
            other.add_adapter("b", peft_lora(target_modules=["c_attn"], bias=second))


@pytest.mark.parametrize("bias", ["all", "lora_only", "none"])
def test_trainable_parameters_are_what_gets_gradients_and_match_peft(bias, tokens):
    # bias="all" used to mark the frozen original of a modules_to_save layer trainable: 64 more
    # parameters counted than peft (two originals' biases), and none of them ever got a gradient.
    config = dict(target_modules=["c_attn"], bias=bias, modules_to_save=["mlp.c_proj"])
    theirs = peft_model(tiny_gpt2, {"default": peft_lora(**config)})
    model = tiny_gpt2()
    add_lora(model, LoraConfig(r=4, alpha=8, targets=["c_attn"], bias=bias, modules_to_save=["mlp.c_proj"]))
    report = trainable_parameters(model)
    assert (report.trainable, report.total) == theirs.get_nb_trainable_parameters()
    expected = {"all": 9_952, "lora_only": 9_472, "none": 9_280}[bias]
    assert report.trainable == expected
    model.train()
    model(tokens, labels=tokens).loss.backward()
    got_gradient = sum(p.numel() for p in model.parameters() if p.grad is not None)
    assert got_gradient == report.trainable
    originals = [p for m in model.modules() if isinstance(m, ModulesToSave) for p in m.original_module.parameters()]
    assert len(originals) == 4 and not any(p.requires_grad for p in originals)


def test_disable_adapters_warns_when_an_adapter_trained_the_biases(tokens):
    model = tiny_gpt2()
    base = logits(model, tokens)
    add_lora(model, LoraConfig(r=4, targets=["c_attn"], bias="all"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    with pytest.warns(UserWarning, match=r"adapter 'default' trains the base model's biases \(bias='all'\): training "
                                         r"changes them in place, so within disable_adapters the model does "
                                         r"not compute as its base"):
        with disable_adapters(model):
            disabled = logits(model, tokens)
    assert (disabled - base).abs().max() > 1e-3  # the warning is true: biases moved
    # peft warns in the same situation
    theirs = peft_model(tiny_gpt2, {"default": peft_lora(target_modules=["c_attn"], bias="all")})
    with pytest.warns(UserWarning, match="does not produce the same output as the base model"):
        with theirs.disable_adapter():
            pass
    plain = tiny_gpt2()
    add_lora(plain, LoraConfig(r=4, targets=["c_attn"], bias="none", init="random"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with disable_adapters(plain):
            torch.testing.assert_close(logits(plain, tokens), base, rtol=0, atol=0)


# --- deleting adapters -----------------------------------------------------------------------------


def test_deleting_the_active_adapter_activates_the_first_remaining_like_peft(tmp_path, tokens):
    adapters = {"a": peft_lora(target_modules=["q_proj"]),
                "b": peft_lora(target_modules=["q_proj", "v_proj"]),
                "c": peft_lora(target_modules=["v_proj"])}
    theirs = peft_model(tiny_llama, adapters)
    ours = peft_to_lorakit(theirs, tiny_llama, tmp_path)
    torch.testing.assert_close(logits(ours, tokens), logits(theirs, tokens), rtol=0, atol=1e-5)
    with pytest.warns(UserWarning, match="Setting active adapter to b"):
        theirs.delete_adapter("a")
    with pytest.warns(UserWarning, match="adapter 'a' was active and is deleted; 'b' is active now"):
        delete_adapter(ours, "a")
    assert active_adapters(ours) == ["b"] == theirs.active_adapters
    b_out = logits(ours, tokens)
    torch.testing.assert_close(b_out, logits(theirs, tokens), rtol=0, atol=1e-5)
    trains = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert len(trains) == 8 and all(".lora_A.b." in n or ".lora_B.b." in n for n in trains)

    # Deleting an inactive adapter changes nothing; deleting one of two active ones keeps the other.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delete_adapter(ours, "c")
    assert active_adapters(ours) == ["b"]
    torch.testing.assert_close(logits(ours, tokens), b_out, rtol=0, atol=0)


def test_deleting_one_of_two_active_adapters_keeps_the_other(tokens):
    model = tiny_llama()
    add_lora(model, LoraConfig(r=4, targets=["q_proj"], init="random"), "a")
    add_lora(model, LoraConfig(r=4, targets=["v_proj"], init="random"), "b")
    set_adapter(model, "b")
    b_out = logits(model, tokens)
    set_adapter(model, ["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        delete_adapter(model, "a")
    assert active_adapters(model) == ["b"]
    torch.testing.assert_close(logits(model, tokens), b_out, rtol=0, atol=0)


def test_deleting_the_last_adapter_leaves_the_base_model(tokens):
    # peft keeps its wrappers with no adapter active; lorakit takes them out: the model is its base
    # again, frozen, biases included.
    model = tiny_gpt2()
    base = logits(model, tokens)
    add_lora(model, LoraConfig(r=4, targets=["c_attn"], bias="lora_only", modules_to_save=["lm_head"],
                               init="random"))
    assert (logits(model, tokens) - base).abs().max() > 1e-3
    delete_adapter(model, "default")
    assert active_adapters(model) == []
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(logits(model, tokens), base, rtol=0, atol=0)


def test_deleting_a_merged_adapter_is_refused_before_any_change():
    # peft refuses too; lorakit used to delete the modules_to_save copy (wte comes first) before
    # meeting the merged layer and raising
    model = tiny_gpt2()
    add_lora(model, LoraConfig(r=4, targets=["c_attn"], modules_to_save=["wte"], init="random"))
    lorakit.merge(model)
    with pytest.raises(ValueError, match=r"adapter 'default' is merged into transformer.h.0.attn.c_attn "
                                         r"and 1 more layers; unmerge\(model\) first"):
        delete_adapter(model, "default")
    assert list(model.transformer.wte.modules_to_save) == ["default"]
    assert active_adapters(model) == ["default"]


# --- modules_to_save held by several adapters --------------------------------------------------------


def test_two_copies_of_one_modules_to_save_layer_are_never_active_together(tmp_path):
    adapters = {"a": peft_lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                "b": peft_lora(target_modules=["v_proj"], modules_to_save=["lm_head"])}
    theirs = peft_model(tiny_llama, adapters)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time"):
        theirs.base_model.set_adapter(["a", "b"])
    with pytest.raises(ValueError, match="target the same module with modules_to_save"):
        theirs.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="cat")

    ours = peft_to_lorakit(theirs, tiny_llama, tmp_path)
    message = (r"adapters 'a' and 'b' both hold a trained copy of lm_head \(modules_to_save\); "
               r"only one copy can apply")
    with pytest.raises(ValueError, match=message + r": activate one of them \(with adapters that do not hold it\)"):
        set_adapter(ours, ["a", "b"])
    assert active_adapters(ours) == ["a"]
    with pytest.raises(ValueError, match=message + ": combine adapters of which at most one holds each such layer"):
        combine_adapters(ours, {"a": 1.0, "b": 1.0}, "ab")
    assert list(lorakit.inject.adapter_configs(ours)) == ["a", "b"]
    assert list(ours.lm_head.modules_to_save) == ["a", "b"]


def test_combined_adapter_carries_the_modules_to_save_copy(tmp_path, tokens):
    adapters = {"a": peft_lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                "b": peft_lora(target_modules=["q_proj", "v_proj"])}
    theirs = peft_model(tiny_llama, adapters)
    with torch.no_grad():  # a trained head
        theirs.base_model.model.lm_head.modules_to_save["a"].weight.add_(0.25)
    ours = peft_to_lorakit(theirs, tiny_llama, tmp_path)
    head = ours.lm_head
    w0, wa = head.original_module.weight.detach().clone(), head.modules_to_save["a"].weight.detach().clone()

    combine_adapters(ours, {"a": 0.5, "b": 1.0}, "ab")
    assert lorakit.inject.adapter_configs(ours)["ab"].modules_to_save == ["lm_head"]
    assert list(head.modules_to_save) == ["a", "ab"]
    copy = head.modules_to_save["ab"].weight
    # the head's change is weighted like every other ΔW: W0 + 0.5 (Wa - W0)
    torch.testing.assert_close(copy, w0 + 0.5 * (wa - w0), rtol=0, atol=1e-7)
    assert not copy.requires_grad and active_adapters(ours) == ["a"]  # added inactive
    set_adapter(ours, "ab")
    assert copy.requires_grad

    # The saved adapter has peft's layout: the same keys and shapes as peft's combined adapter.
    theirs.add_weighted_adapter(["a", "b"], [0.5, 1.0], "ab", combination_type="cat")
    assert theirs.peft_config["ab"].modules_to_save == ["lm_head"]
    theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["ab"])
    save_adapter(ours, tmp_path / "ours", "ab")

    def layout(path):
        with safe_open(path / "adapter_model.safetensors", framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    assert layout(tmp_path / "ours") == layout(tmp_path / "theirs" / "ab")
    assert "base_model.model.lm_head.weight" in layout(tmp_path / "ours")

    # Combining one adapter with weight 1 reproduces it, head included (peft's copy is the untrained
    # original head, so its combined adapter loses what the head learned).
    set_adapter(ours, "a")
    a_out = logits(ours, tokens)
    combine_adapters(ours, {"a": 1.0}, "a1")
    set_adapter(ours, "a1")
    torch.testing.assert_close(logits(ours, tokens), a_out, rtol=1e-5, atol=1e-5)
