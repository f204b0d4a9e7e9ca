"""The memory planner: seed figures, parameter counts, trainable counts vs peft, JSON, errors."""

import argparse
import json

import pytest
import torch

from lorakit.cli import plan as plan_cli
from lorakit.planner import (
    GiB, Architecture, PlanConfig, arch_from_config, fits, plan, render_plan, resolve_model,
    trainable_parameters,
)
from lorakit.planner import PRESETS, find_preset


def test_seed_lora_example_4096_r8():
    # One 4096 x 4096 linear with r = 8: A is 8 x 4096, B is 4096 x 8: 65,536 params, 256x fewer.
    arch = Architecture("one", 4096, 4096, 1, 32, 32, 128, 32000, False)
    n = trainable_parameters(arch, PlanConfig(method="lora", rank=8, targets=("q_proj",)))
    assert n == 65_536
    assert 4096 * 4096 // n == 256


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


def test_qlora_4bit_weights_match_seed():
    def weights_gb(name):
        c = plan(name, method="qlora", recommend=False).components
        return (c["base_weights"] + c["quant_constants"]) / 1e9

    assert 3.5 <= weights_gb("llama-2-7b") <= 4.2  # "~4 GB for a 7B base in 4-bit"
    assert 35 <= weights_gb("llama-2-70b") <= 40  # "~40 GB for 70B" (35-40)
    # 4.127 bits per quantized weight with double quantization, 4.5 without.
    p = plan("llama-2-7b", method="qlora", recommend=False)
    bits = 8 * (p.quantized_params / 2 + p.components["quant_constants"]) / p.quantized_params
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-6)
    p = plan("llama-2-7b", method="qlora", double_quant=False, recommend=False)
    assert p.components["quant_constants"] * 8 / p.quantized_params == pytest.approx(0.5)


def test_70b_full_finetuning_is_hundreds_of_gb():
    p = plan("llama-2-70b", method="full", recommend=False)
    assert 300 * GiB < p.peak < 1000 * GiB
    assert p.components["optimizer_states"] == 2 * 2 * p.total_params  # two bf16 AdamW states


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=500, tie_word_embeddings=False)
    return cfg, LlamaForCausalLM(cfg)


@pytest.mark.parametrize("targets", [None, "all-linear", ("k_proj", "down_proj"), r".*\.(o_proj|up_proj)"])
def test_trainable_count_matches_peft(targets):
    # Switch to lorakit's add_lora / trainable_parameters once the LoRA core lands.
    from peft import LoraConfig, get_peft_model

    cfg, model = _tiny_llama()
    arch = arch_from_config(cfg.to_dict())
    assert arch.num_parameters() == sum(p.numel() for p in model.parameters())
    peft_targets = ["q_proj", "v_proj"] if targets is None else (
        list(targets) if isinstance(targets, tuple) else targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=peft_targets))
    measured = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable_parameters(arch, PlanConfig(method="lora", rank=4, targets=targets)) == measured


def test_activation_formula_matches_saved_tensors():
    # Bytes autograd saves in a forward pass with lorakit's loss (unique storages, parameters
    # excluded) equal the plan's activations + what the chunked loss keeps for backward: the
    # gradients of the hidden states (T x h, bf16) and of the head (V x h, float32).
    from lorakit.loss import model_loss

    cfg, model = _tiny_llama()
    model = model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and t.dtype != torch.int64:
            saved[s.data_ptr()] = s.nbytes()
        return t

    ids = torch.randint(0, 500, (2, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model_loss(model, input_ids=ids, labels=ids)
    p = plan(arch_from_config(cfg.to_dict()), method="full", batch_size=2, seq_len=32, recommend=False)
    expected = p.activations_without_checkpointing + 2 * 32 * 64 * 2 + 500 * 64 * 4
    assert sum(saved.values()) == pytest.approx(expected, rel=0.005)  # + RoPE cos/sin


def test_checkpointing_reduces_activations_and_plan_is_consistent():
    p = plan("llama-3.1-8b", method="lora", recommend=False)
    q = plan("llama-3.1-8b", method="lora", grad_checkpointing=True, recommend=False)
    assert q.activations_with_checkpointing == p.activations_with_checkpointing
    assert q.components["activations"] < p.components["activations"] / 5
    assert q.peak < p.peak
    assert p.peak == p.peak_allocated + p.runtime_overhead == max(p.phases.values()) + p.runtime_overhead


def test_fsdp_sharding_and_fits():
    p = plan("llama-3.1-70b", method="full", grad_checkpointing=True, recommend=False)
    assert not fits(p, 80, 1) and not fits(p, 80, 8) and fits(p, 80, 16)  # ~8 bytes/param / N + activations
    sharded = plan("llama-3.1-70b", method="full", n_gpus=8, recommend=False)
    assert sharded.peak < p.peak / 4
    assert fits(plan("llama-3.2-1b", method="lora", recommend=False), 24)


@pytest.mark.parametrize("name,budget,method", [
    ("llama-3.1-70b", 48, "qlora"), ("llama-3.1-8b", 24, "qlora"), ("llama-3.2-3b", 24, "lora"),
    ("llama-3.1-8b", 80, "lora"),
])
def test_recommendation_follows_seed_rules(name, budget, method):
    r = plan(name, budget_gib=budget).recommendation
    assert r.method == method and r.reason


def test_full_recommended_only_for_domain_shift():
    assert plan("smollm2-360m", budget_gib=80).recommendation.method == "lora"
    assert plan("smollm2-360m", budget_gib=80, domain_shift=True).recommendation.method == "full"


def test_json_schema_and_render():
    d = json.loads(json.dumps(plan("mistral-7b", method="qlora").to_dict()))
    assert d["schema_version"] == 1
    assert set(d["components_bytes"]) == {"base_weights", "quant_constants", "adapter_weights", "gradients",
                                          "optimizer_states", "activations", "logits_and_loss", "transient",
                                          "runtime_overhead"}
    assert set(d["activations_bytes"]) == {"without_checkpointing", "with_checkpointing"}
    assert d["parameters"]["trainable"] == 32 * 8 * (2 * 4096 + 4096 + 1024)
    assert set(d["fits"]) == {"16", "24", "40", "48", "80", "141"}
    assert d["recommendation"]["method"] in ("full", "lora", "qlora")
    assert d["peak_bytes"] == d["peak_allocated_bytes"] + d["runtime_overhead_bytes"]
    text = render_plan(plan("mistral-7b", method="qlora"))
    assert "predicted peak" in text and "recommendation: " in text and "141 GiB" in text


def test_local_config_and_aliases(tmp_path):
    cfg, _ = _tiny_llama()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert resolve_model(str(tmp_path)).hidden_size == 64
    assert resolve_model(str(tmp_path / "config.json")).num_layers == 3
    assert find_preset("meta-llama/Meta-Llama-3-8B") is PRESETS["llama-3.1-8b"]
    assert find_preset("LLAMA-2-7B") is PRESETS["llama-2-7b"]


def test_errors_name_value_and_choices(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"'llama-9b'.*presets: llama-2-7b, .*smollm2-1.7b"):
        plan("llama-9b")
    with pytest.raises(ValueError, match=r"hub id 'nobody/nothing' is not reachable.*presets:"):
        plan("nobody/nothing")
    with pytest.raises(ValueError) as err:
        plan("llama-2-7b", method="dora", optimizer="lion", dtype="int8", batch_size=0, lora_dropout=1.5)
    msg = str(err.value)  # every problem at once
    for piece in ("method 'dora' is not one of full, lora, qlora", "optimizer 'lion' is not one of adamw",
                  "dtype 'int8' is not one of bf16, fp16, fp32", "batch_size must be a positive integer, got 0",
                  "lora_dropout must be in [0, 1)"):
        assert piece in msg
    # lorakit's NF4 layers compute in float32 too (CPU QLoRA): a valid plan, base in 4 bits
    fp32 = plan("llama-2-7b", method="qlora", dtype="fp32", recommend=False)
    assert fp32.components["base_weights"] < plan("llama-2-7b", method="lora", dtype="bf16", recommend=False).components["base_weights"]
    with pytest.raises(ValueError, match=r"targets \('q_proj', 'v_proj'\) match no linear module of phi-3-mini; "
                                         r"its linear modules: qkv_proj, o_proj, gate_up_proj, down_proj"):
        plan("phi-3-mini", method="lora")
    with pytest.raises(ValueError, match=r"targets regex '\(' does not compile"):
        plan("llama-2-7b", targets="(")
    with pytest.raises(ValueError, match=r"model_type 'bert' is not supported.*llama, mistral"):
        arch_from_config({"model_type": "bert", "hidden_size": 8})
    with pytest.raises(ValueError, match="lacks intermediate_size"):
        arch_from_config({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                          "num_attention_heads": 1, "vocab_size": 4})


def _parse(argv):
    parser = argparse.ArgumentParser(prog="lorakit")
    plan_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_json(capsys):
    args = _parse(["plan", "--model", "llama-3.1-8b", "--method", "qlora", "--targets", "all-linear",
                   "--batch", "2", "--seq", "1024", "--grad-checkpointing", "--json"])
    assert args.run(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["config"]["targets"] == "all-linear" and d["config"]["grad_checkpointing"] is True
    assert d["parameters"]["trainable"] == 32 * 8 * (8192 + 5120 + 5120 + 8192 + 3 * 18432)  # r*(in+out), 7 linears


def test_cli_table_and_error(capsys):
    args = _parse(["plan", "--model", "qwen2.5-7b", "--targets", "q_proj", "k_proj", "--gpus", "2"])
    assert plan_cli.run(args) == 0
    assert "gpus=2" in capsys.readouterr().out
    args = _parse(["plan", "--model", "nope"])
    assert plan_cli.run(args) == 2
    assert "presets:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["plan", "--model", "llama-2-7b", "--method", "dora"])


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
    with pytest.raises(ValueError) as err:
        plan({**LLAMA, **change})
    assert str(err.value) == f"config of model_type 'llama' is not a model the planner can size: {says}"


@pytest.mark.parametrize("budget", [-5, 0, float("nan"), float("inf"), 2.0**21])
def test_gpu_budget_must_be_a_positive_number_of_gib(budget):
    with pytest.raises(ValueError, match=rf"budget_gib \(lorakit plan --gpu-gb\) = {budget!r} must be a number "
                                         r"of GiB in \(0, 1,048,576\]"):
        plan(LLAMA, budget_gib=budget)
    assert plan(LLAMA, budget_gib=0.5).recommendation.budget_gib == 0.5


def test_plan_config_bounds():
    with pytest.raises(ValueError, match="rank must be at most 65,536, got 100,000,000; seq_len must be at most "
                                         "16,777,216, got 1,000,000,000"):
        plan(LLAMA, rank=10**8, seq_len=10**9)
