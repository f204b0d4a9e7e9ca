"""serving.py: one test per rule of vLLM, SGLang and LoRAX, on adapter_config.json dicts as PEFT
(and lorakit) writes them, and on an adapter lorakit saved."""

import json

from conftest import tiny_llama
from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.serving import lorax_problems, serving_problems, sglang_problems, vllm_problems, wrongly_scaled

PLAIN = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none", "use_dora": False,
         "use_rslora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


def config(**changes):
    return {**PLAIN, **changes}


def test_a_plain_adapter_loads_everywhere():
    assert serving_problems(PLAIN) == []
    assert serving_problems(config(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj", "lm_head"])) == []
    assert serving_problems(config(target_modules="all-linear")) == []


def test_vllm_rank_rules():
    assert vllm_problems(config(r=16)) == []
    assert vllm_problems(config(r=17)) == [
        "vLLM: rank 17 is above the default --max-lora-rank 16; start vLLM with --max-lora-rank 32"]
    assert vllm_problems(config(r=8, rank_pattern={"down_proj": 300})) == [
        "vLLM: rank 300 is above the default --max-lora-rank 16; start vLLM with --max-lora-rank 320"]
    assert vllm_problems(config(r=1024)) == ["vLLM: rank 1024 is above the largest --max-lora-rank (512)"]


def test_dora_is_refused_by_vllm_and_sglang_and_dropped_by_lorax():
    dora = config(use_dora=True)
    assert vllm_problems(dora) == ["vLLM: DoRA adapters (use_dora) are refused"]
    assert sglang_problems(dora) == ["SGLang: DoRA adapters (use_dora) are refused"]
    assert lorax_problems(dora) == ["LoRAX: loads the adapter but ignores DoRA's magnitude vectors (use_dora): it "
                                    "would answer differently from the adapter trained"]


def test_modules_to_save_and_biases():
    saved = config(modules_to_save=["lm_head"], bias="lora_only")
    assert vllm_problems(saved) == [
        "vLLM: modules_to_save ['lm_head'] is refused (only None is supported); merge the adapter (lorakit merge / "
        "lorakit export) to serve it",
        "vLLM: bias='lora_only': trained biases are not supported (bias must be 'none')"]
    assert sglang_problems(saved) == []  # no rule known: SGLang's checks do not read them
    assert lorax_problems(saved) == [
        "LoRAX: loads the adapter but ignores modules_to_save ['lm_head'], trained biases (bias='lora_only'): it "
        "would answer differently from the adapter trained"]


def test_sglang_refuses_target_patterns():
    assert sglang_problems(config(target_modules="all")) == []
    assert sglang_problems(config(target_modules=r".*\.(q|v)_proj")) == [
        r"SGLang: target_modules '.*\\.(q|v)_proj' (a pattern) is refused: it reads a list of module names, or "
        "'all' / 'all-linear'"]


def test_lorax_ignores_targets_outside_its_list():
    assert lorax_problems(config(target_modules=["q_proj", "embed_tokens", "model.layers.0.mlp.up_proj",
                                                 "fc1"])) == [
        "LoRAX: target modules embed_tokens, fc1 are ignored (with a warning) on Llama, Mistral and Qwen2; "
        "supported: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"]


def test_rank_and_alpha_patterns_matter_only_when_they_change_a_scale():
    # alpha/r = 2 for the adapter; gate_proj: 4/2 = 2 (same), up_proj: 8/2 = 4 (other), down_proj: 16/8 = 2 (same)
    patterned = config(r=8, lora_alpha=16, rank_pattern={"gate_proj": 2, "up_proj": 2},
                       alpha_pattern={"gate_proj": 4, "down_proj": 16})
    assert wrongly_scaled(patterned) == ["up_proj"]
    assert sglang_problems(patterned) == [
        "SGLang: rank_pattern/alpha_pattern are not read (one scale lora_alpha/r): up_proj would be served with the "
        "wrong scale"]
    assert lorax_problems(patterned) == [
        "LoRAX: loads the adapter but ignores the rank_pattern/alpha_pattern scales of up_proj: it would answer "
        "differently from the adapter trained"]
    # rsLoRA: alpha/sqrt(r): 16/sqrt(8) for the adapter vs 4/sqrt(2) for gate_proj (now different)
    assert wrongly_scaled({**patterned, "use_rslora": True}) == ["gate_proj", "up_proj"]


def test_sglang_does_not_read_rslora():
    assert sglang_problems(config(r=16, use_rslora=True)) == [
        "SGLang: use_rslora is not read: every module would be served with scale lora_alpha/r instead of "
        "lora_alpha/sqrt(r) (sqrt(16) times too small)"]
    assert lorax_problems(config(r=16, use_rslora=True)) == []  # LoRAX reads use_rslora


def test_rules_read_the_keys_lorakit_writes(tmp_path):
    model = add_lora(tiny_llama(), LoraConfig(r=8, alpha=16, targets=["q_proj", "embed_tokens", "up_proj"],
                                               rslora=True, rank_pattern={"up_proj": 4}))
    save_adapter(model, tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert serving_problems(written) == [
        "SGLang: use_rslora is not read: every module would be served with scale lora_alpha/r instead of "
        "lora_alpha/sqrt(r) (sqrt(8) times too small)",
        "LoRAX: loads the adapter but ignores the rank_pattern/alpha_pattern scales of up_proj: it would answer "
        "differently from the adapter trained",
        "LoRAX: target modules embed_tokens are ignored (with a warning) on Llama, Mistral and Qwen2; supported: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"]
