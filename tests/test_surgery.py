"""Module surgery (surgery.py): which full names a target spec selects, block indices, the output
head, and replacing a module in its parent, checked as exact lists and values on the tiny models."""

import pytest
import torch
from conftest import MLP, tiny_gpt2, tiny_llama
from torch import nn

from lorakit import LoraConfig, add_lora, gated_mlp, lean, rms_norm
from lorakit.surgery import (
    layer_index,
    matches,
    output_head_names,
    parent,
    replace_module,
    unwrapped_modules,
)


def selected(model, spec):
    return [name for name, _ in model.named_modules() if name and matches(spec, name)]


def test_a_list_selects_full_names_and_dotted_suffixes():
    model = tiny_llama()
    assert selected(model, ["q_proj", "v_proj"]) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert selected(model, ["mlp.up_proj"]) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert selected(model, ["model.layers.1.mlp.down_proj", "lm_head"]) == ["model.layers.1.mlp.down_proj", "lm_head"]
    # a suffix must end at a dot: "proj" and "_proj" are parts of names, not names
    assert selected(model, ["proj", "_proj", "q"]) == []
    assert selected(model, []) == []
    assert selected(model, ["layers"]) == ["model.layers"]
    assert selected(tiny_gpt2(), ["c_proj"]) == ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                                                 "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]


def test_a_string_is_a_regex_matched_against_the_whole_name():
    model = tiny_llama()
    assert selected(model, r".*\.1\.self_attn\.[qk]_proj") == ["model.layers.1.self_attn.q_proj",
                                                               "model.layers.1.self_attn.k_proj"]
    assert len(selected(model, r"model\.layers\.\d+\..*_proj")) == 14  # 7 per block, 2 blocks
    assert selected(model, "q_proj") == []  # fullmatch: a regex is not a suffix
    assert selected(model, "lm_head") == ["lm_head"]
    assert matches(r"a|b", "a") and not matches(r"a|b", "ab")


def test_layer_index_is_the_number_after_the_blocks_container():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("encoder.layer.0.attention.self.query") == 0
    assert layer_index("blocks.7") == 7
    assert layer_index("model.embed_tokens") is None
    assert layer_index("lm_head") is None
    assert layer_index("model.sublayers.3.fc") is None  # "layers" must be a whole name part
    # the first pattern that occurs decides; a given pattern (or list) replaces the defaults
    assert layer_index("model.layers.2.blocks.5.fc") == 2
    assert layer_index("model.layers.2.blocks.5.fc", "blocks") == 5
    assert layer_index("model.layers.2.blocks.5.fc", ["experts", "blocks"]) == 5
    assert layer_index("model.layers.2.fc", ["experts"]) is None
    assert [layer_index(n) for n in selected(tiny_llama(), ["o_proj"])] == [0, 1]


def test_output_head_names():
    assert output_head_names(tiny_llama()) == {"lm_head"}
    assert output_head_names(tiny_gpt2()) == {"lm_head"}
    assert output_head_names(MLP()) == {"lm_head"}  # a model that does not say

    class Named(MLP):
        def get_output_embeddings(self):
            return self.fc2

    assert output_head_names(Named()) == {"fc2"}
    # a head wrapped by an adapter is still the head, under its own name, not "fc2.base_layer"
    lora = add_lora(Named(), LoraConfig(r=2, targets=["fc1", "fc2"]))
    assert output_head_names(lora) == {"fc2"}
    saved = add_lora(Named(), LoraConfig(r=2, targets=["fc1"], modules_to_save=["fc2"]))
    assert output_head_names(saved) == {"fc2"}


def test_unwrapped_modules_see_the_base_model_through_adapters():
    base = tiny_llama()
    before = [(name, type(module)) for name, module in base.named_modules()]
    q_proj = base.model.layers[1].self_attn.q_proj
    add_lora(base, LoraConfig(r=2, targets=["q_proj", "o_proj"], modules_to_save=["lm_head"]))
    after = list(unwrapped_modules(base))
    # the classes as before; add_lora's lean gated MLPs and norms (lean.py) are their plain class's subclass
    assert [(name, type(module).plain_class if lean.is_lean(module) else type(module))
            for name, module in after] == before
    assert sum(gated_mlp.is_lean(module) for _, module in after) == 2
    assert sum(rms_norm.is_lean(module) for _, module in after) == 5  # two per layer and the final norm
    assert dict(after)["model.layers.1.self_attn.q_proj"] is q_proj
    # what the walk skips: each of the 4 LoRA wrappers holds its base_layer, three ModuleDicts
    # (lora_A, lora_B, lora_dropout) of one entry each and DoRA's (empty) lora_magnitude_vector
    # ParameterDict, 8 modules; the modules_to_save wrapper holds original_module, a ModuleDict and
    # the trained copy, 3
    assert len(list(base.named_modules())) == len(before) + 4 * 8 + 3


def test_replace_module_puts_the_new_module_in_its_parent(tokens):
    model = tiny_llama()
    assert parent(model, "model.layers.1.mlp.down_proj") == (model.model.layers[1].mlp, "down_proj")
    assert parent(model, "lm_head") == (model, "lm_head")
    head = model.lm_head
    zero = nn.Linear(32, 96, bias=True)
    with torch.no_grad():
        zero.weight.zero_()
        zero.bias.copy_(torch.arange(96.0))
    assert replace_module(model, "lm_head", zero) is head
    assert model.lm_head is zero and model.get_output_embeddings() is zero
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, torch.arange(96.0).expand(2, 10, 96))
    old = replace_module(model, "model.layers.0.self_attn.q_proj", nn.Identity())
    assert isinstance(old, nn.Linear) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Identity)
    with pytest.raises(AttributeError):
        replace_module(model, "model.layers.5.mlp", nn.Identity())  # no such module: nothing changed
    assert len(model.model.layers) == 2
