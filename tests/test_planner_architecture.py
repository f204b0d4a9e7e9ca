"""planner.architecture and planner.presets: shapes, parameter counts, config checks, model resolution."""

import json
from dataclasses import replace

import pytest

from lorakit.planner import PRESETS, Architecture, arch_from_config, find_preset, resolve_model, targeted_modules


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False)


@pytest.mark.parametrize("name,total", [
    ("llama-2-7b", 6_738_415_616), ("llama-2-13b", 13_015_864_320), ("llama-2-70b", 68_976_648_192),
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.1-70b", 70_553_706_496), ("llama-3.2-1b", 1_235_814_400),
    ("mistral-7b", 7_241_732_096), ("mixtral-8x7b", 46_702_792_704), ("qwen2.5-7b", 7_615_616_512),
    ("qwen2.5-0.5b", 494_032_768), ("gemma-2-9b", 9_241_705_984), ("phi-3-mini", 3_821_079_552),
    ("smollm2-135m", 134_515_008),
])
def test_preset_parameter_totals_match_published(name, total):
    assert PRESETS[name].num_parameters() == total


def test_every_preset_is_within_its_nominal_size():
    for name, arch in PRESETS.items():
        assert arch.num_parameters() > 1e8, name
        assert arch.q_dim % arch.kv_dim == 0, name  # GQA groups are whole


def test_tiny_model_parameter_count_matches_transformers():
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    model = LlamaForCausalLM(cfg)
    assert arch_from_config(cfg.to_dict()).num_parameters() == sum(p.numel() for p in model.parameters())


def test_local_config_and_aliases(tmp_path):
    cfg = tiny_llama_config()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert resolve_model(str(tmp_path)).hidden_size == 64
    assert resolve_model(str(tmp_path / "config.json")).num_layers == 3
    assert find_preset("meta-llama/Meta-Llama-3-8B") is PRESETS["llama-3.1-8b"]
    assert find_preset("LLAMA-2-7B") is PRESETS["llama-2-7b"]
    # lorakit's default model, by its name and its hub id
    assert find_preset("SmolLM2-135M-Instruct") is PRESETS["smollm2-135m"]
    assert find_preset("HuggingFaceTB/SmolLM2-135M-Instruct") is PRESETS["smollm2-135m"]


def test_default_model_has_the_smollm2_135m_preset_shapes():
    # `lorakit plan` plans the default run with the preset; the default model (the GGUF that
    # lorakit converts on first use) must have exactly its shapes
    from transformers import AutoConfig

    from lorakit.models import GGUF_FILE, find_default_gguf

    gguf = find_default_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=GGUF_FILE, local_files_only=True)
    arch = arch_from_config(config.to_dict(), name="smollm2-135m")
    assert arch == replace(PRESETS["smollm2-135m"], hub_id="")


def test_unknown_models_and_configs_name_the_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'llama-9b' is neither a preset, an existing path nor a hub id; "
                                         r"presets: llama-2-7b, .*smollm2-1.7b"):
        resolve_model("llama-9b")
    with pytest.raises(ValueError, match=r"model config 'nowhere' does not exist; pass a config.json or a directory that holds one"):
        arch_from_config("nowhere")


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}


@pytest.mark.parametrize("change, says", [
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be in [1, 65,536]"),
    ({"hidden_size": "64"}, "hidden_size='64' must be an integer, not a str"),
    ({"num_hidden_layers": 2.0}, "num_hidden_layers=2.0 must be an integer, not a float"),
    ({"num_hidden_layers": 1e30}, "num_hidden_layers=1e+30 must be an integer, not a float"),
    ({"num_hidden_layers": 10**30}, "num_hidden_layers=1000000000000000000000000000000 must be in [1, 10,000]"),
    ({"hidden_size": -64}, "hidden_size=-64 must be in [1, 1,048,576]"),
    ({"vocab_size": True}, "vocab_size=True must be an integer, not a bool"),
    ({"num_key_value_heads": 3}, "num_attention_heads=4 must be a multiple of num_key_value_heads=3"),
    ({"hidden_size": 66}, "hidden_size=66 must be a multiple of num_attention_heads=4 (or give head_dim)"),
])
def test_config_sizes_must_be_integers_in_sane_ranges(change, says):
    from lorakit.planner import plan

    with pytest.raises(ValueError) as err:
        plan({**LLAMA, **change})
    assert str(err.value) == f"config of model_type 'llama' is not a model the planner can size: {says}"


def test_targeted_modules_follow_surgery_matches():
    arch = Architecture("one", 64, 128, 3, 4, 2, 16, 96, False)
    names = lambda targets: [n for n, _, _ in targeted_modules(arch, targets)]  # noqa: E731
    assert names(None) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert names(["q_proj", "self_attn.o_proj", "up_proj"]) == ["self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj"]
    assert names(["model.layers.2.mlp.down_proj"]) == ["mlp.down_proj"]  # one layer's full name: every layer's
    assert names(r"model\.layers\.1\.(self_attn\.k|mlp\.gate)_proj") == ["self_attn.k_proj", "mlp.gate_proj"]
    assert names("all-linear") == [n for n, _, _ in arch.linear_modules()]
    with pytest.raises(ValueError, match=r"targets \['proj'\] match no linear module of one; its linear "
                                         r"modules: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"):
        targeted_modules(arch, ["proj"])  # a suffix must start at a dot, as in peft
    with pytest.raises(ValueError, match=r"targets regex '\(' does not compile"):
        targeted_modules(arch, "(")
    with pytest.raises(ValueError, match=r"targets regex .*\(\(\.\)\*\)\*!"):
        targeted_modules(arch, "((.)*)*!")  # could backtrack without end: refused before matching
