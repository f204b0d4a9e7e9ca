"""The planner on adapters beyond plain LoRA on linears: LoRA on mixture-of-experts parameters
(lora.target_parameters, layer.LoraParameter) and DoRA (lora.dora): the trainable count against the
real model, and the exact terms a DoRA plan adds to the LoRA plan."""

import warnings

import pytest
from test_architectures import tiny_model

from lorakit import LoraConfig, add_lora
from lorakit.config import RunConfig
from lorakit.inject import trainable_parameters
from lorakit.planner import (
    Architecture,
    PlanConfig,
    arch_from_config,
    memory,
    plan,
    plan_run,
)

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_expert_lora_count_equals_the_model(model_type):
    # all-linear plus per-expert LoRA: r*(in + out) per linear, r*E*(in + out) per 3-D expert weight
    arch = arch_from_config(tiny_model(model_type).config.to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = add_lora(tiny_model(model_type), LoraConfig(r=2, targets="all-linear", target_parameters=EXPERTS))
    planned = memory.trainable_parameters(arch, PlanConfig(rank=2, targets="all-linear", target_parameters=EXPERTS))
    assert planned == trainable_parameters(model).trainable
    if model_type == "mixtral":  # tests/test_moe_lora.py's count on top of the linears
        linears = memory.trainable_parameters(arch, PlanConfig(rank=2, targets="all-linear"))
        assert planned - linears == 2 * (8 * 160 + 8 * 96)


def test_expert_lora_from_the_run_config():
    arch = arch_from_config(tiny_model("mixtral").config.to_dict())
    run = RunConfig.from_dict({"lora": {"r": 2, "targets": [], "target_parameters": EXPERTS}})
    p = plan_run(run, arch, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = add_lora(tiny_model("mixtral"), LoraConfig(r=2, targets=[], target_parameters=EXPERTS))
    assert p.trainable_params == trainable_parameters(model).trainable == 2 * (8 * 160 + 8 * 96)
    # the adapters' weights, gradients and AdamW states follow the count (float32: 16 bytes each)
    assert p.components["adapter_weights"] + p.components["gradients"] + p.components["optimizer_states"] \
        == 16 * p.trainable_params
    with pytest.raises(ValueError, match=r"target_parameters \['experts.nope'\] match no parameter .*"
                                         r"mlp.experts.gate_up_proj, mlp.experts.down_proj"):
        plan(arch, target_parameters=["experts.nope"])
    with pytest.raises(ValueError, match=r"target_parameters must be a non-empty list of parameter names"):
        plan(arch, target_parameters=[3])


def test_formula_arch_experts_match_the_measured_shapes():
    # the mixtral preset path (formulas) names and sizes the expert weights as transformers builds them
    model = tiny_model("mixtral")
    arch = arch_from_config(model.config.to_dict())
    assert arch.measured is None
    real = {n.removeprefix("model.layers.0."): tuple(p.shape) for n, p in model.named_parameters()
            if n.startswith("model.layers.0.") and p.dim() in (2, 3)}
    assert dict(arch.parameter_shapes()) == real


@pytest.mark.parametrize("dtype,method,copy", [("bfloat16", "lora", 4), ("float32", "lora", 0),
                                               ("bfloat16", "qlora", 4), ("float32", "qlora", 4)])
def test_dora_plan_adds_exactly_the_documented_terms(dtype, method, copy):
    arch = Architecture("one", 256, 512, 3, 4, 2, 64, 1000, False)
    kw = {"method": method, "rank": 8, "targets": "all-linear", "dtype": dtype, "batch_size": 2, "seq_len": 64,
          "recommend": False}
    lora, dora = plan(arch, **kw), plan(arch, dora=True, **kw)
    modules = arch.linear_modules()
    outs = sum(o for _, _, o in modules)
    p = 2 if dtype == "bfloat16" else 4
    layers, tokens = arch.num_layers, 2 * 64
    # a magnitude per output: one float32 trainable parameter each (weight + gradient + 2 AdamW moments)
    assert dora.trainable_params - lora.trainable_params == layers * outs
    for key in ("adapter_weights", "gradients"):
        assert dora.components[key] - lora.components[key] == 4 * layers * outs
    assert dora.components["optimizer_states"] - lora.components["optimizer_states"] == 8 * layers * outs
    # saved for backward: the (tokens, out) product the magnitude scales, in the compute dtype
    assert dora.activations_without_checkpointing - lora.activations_without_checkpointing \
        == layers * tokens * p * outs
    # the weight norm: B A and scale * B A in float32, plus a float32 copy of a 16-bit / NF4 base
    largest = max(i * o for _, i, o in modules)
    assert memory.dora_norm_bytes(arch, dora.config) == (8 + copy) * largest
    assert memory.transient_bytes(arch, dora.config) - memory.transient_bytes(arch, lora.config) \
        == (8 + copy) * largest
    assert memory.dora_norm_bytes(arch, lora.config) == 0


def test_dora_from_the_run_config():
    run = RunConfig.from_dict({"lora": {"dora": True}})
    plain = RunConfig.from_dict({})
    arch = Architecture("one", 256, 512, 3, 4, 2, 64, 1000, False)
    assert plan_run(run, arch, "cpu").config.dora and not plan_run(plain, arch, "cpu").config.dora
    assert plan_run(run, arch, "cpu").peak > plan_run(plain, arch, "cpu").peak
