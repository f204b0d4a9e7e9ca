"""planner.recommend: the seed's rules for full / LoRA / QLoRA, the GPU budget, the device warning."""

import pytest

from lorakit.planner import GiB, device_warning, plan

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}


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


def test_peaks_are_each_methods_plan_most_memory_first():
    r = plan("llama-3.1-8b", dtype="fp32").recommendation
    assert list(r.peaks_gib) == ["full", "lora", "qlora"]
    assert r.peaks_gib["lora"] == plan("llama-3.1-8b", dtype="fp32", recommend=False).peak / GiB
    # QLoRA of a float32 plan computes in bfloat16
    assert r.peaks_gib["qlora"] == plan("llama-3.1-8b", method="qlora", recommend=False).peak / GiB


def test_nothing_fits_names_the_smallest_way_out():
    r = plan("llama-3.1-405b", budget_gib=16).recommendation
    assert (r.method, r.reason) == ("qlora", "nothing fits on 16 GiB (QLoRA needs 327.6 GiB); QLoRA is the smallest: "
                                    "use larger GPUs or enable gradient checkpointing, or shorten batch x sequence")
    r = plan("llama-3.1-70b", budget_gib=24, grad_checkpointing=True).recommendation
    assert r.reason == ("nothing fits on 24 GiB (QLoRA needs 43.4 GiB); QLoRA is the smallest: shard over 4 GPUs, "
                        "or shorten batch x sequence")


@pytest.mark.parametrize("budget", [-5, 0, float("nan"), float("inf"), 2.0**21])
def test_gpu_budget_must_be_a_positive_number_of_gib(budget):
    with pytest.raises(ValueError, match=rf"budget_gib \(lorakit plan --gpu-gb\) = {budget!r} must be a number "
                                         r"of GiB in \(0, 1,048,576\]"):
        plan(LLAMA, budget_gib=budget)
    assert plan(LLAMA, budget_gib=0.5).recommendation.budget_gib == 0.5


def test_device_warning():
    p = plan("llama-3.1-8b", method="lora", recommend=False)
    assert device_warning(p, p.peak / GiB) is None
    assert device_warning(p, 16) == (f"warning: the planned step needs {p.peak / GiB:.1f} GiB but the device has "
                                     "16.0 GiB; try gradient checkpointing, a smaller batch or sequence, or method "
                                     "'qlora' (`lorakit plan` shows the breakdown)")
