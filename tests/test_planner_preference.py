"""planner: a DPO / ORPO step (objective dpo or orpo). B pairs are 2B rows, so the plan of B pairs is
the SFT plan of 2B rows except for the loss's term (memory.preference_logits_bytes), for the n_a
scored answer tokens: with a frozen head, the hidden states' gradient n_a * h * p + one chunk of
C = min(256, n_a) float32 logits turned into their softmax in place, 4 * C * V, and in 16-bit the
chunk's logits before their upcast, p * C * V; a trained head (full) 16 * n_a * V + n_a * h * p. Numbers by hand on
SmolLM2-135M's shapes (h = 576, V = 49152, tied embeddings)."""

import pytest

from lorakit.config import RunConfig
from lorakit.planner import PlanConfig, memory, plan, plan_run, resolve_model

SMOL = resolve_model("smollm2-135m")
V, H = 49152, 576


def run(objective: str, batch: int, method: str = "lora", dtype: str = "bfloat16") -> RunConfig:
    return RunConfig.from_dict({"objective": objective, "method": method, "model": {"dtype": dtype},
                                "data": {"max_length": 64}, "train": {"batch_size": batch}})


def test_dpo_plan_is_sft_with_2b_rows_and_the_preference_loss_term():
    dpo = plan_run(run("dpo", 2), SMOL, "cuda")
    sft = plan_run(run("sft", 4), SMOL, "cuda")  # the same 4 rows of 64 tokens under SFT
    assert (dpo.config.objective, dpo.config.rows, dpo.config.tokens, dpo.config.scored_tokens) == ("dpo", 4, 256, 256)
    # the loss terms, by hand: both the hidden states' gradient + one chunk of 256 float32 logits made
    # their softmax in place, and its bf16 logits before the upcast (SFT: or the softmax's bf16 cast)
    assert dpo.components["logits_and_loss"] == 256 * H * 2 + 256 * V * 4 + 256 * V * 2 == 75_792_384
    assert sft.components["logits_and_loss"] == 256 * H * 2 + 256 * V * (4 + 2) == 75_792_384
    extra = 0
    # no second copy of the weights (the reference is the adapters switched off), no other difference
    for key in ("base_weights", "quant_constants", "adapter_weights", "gradients", "optimizer_states",
                "activations", "transient"):
        assert dpo.components[key] == sft.components[key], key
    assert dpo.phases["backward start"] - sft.phases["backward start"] == extra
    for phase in ("layer backward", "backward end", "optimizer step"):
        assert dpo.phases[phase] == sft.phases[phase], phase
    assert dpo.peak_phase == "backward start"
    assert dpo.peak_allocated == sft.peak_allocated + extra


def test_dpo_plan_of_b_pairs_against_sft_of_b_rows():
    # what a user compares: the same batch_size under sft and dpo; the activations double
    dpo = plan_run(run("dpo", 2), SMOL, "cuda")
    sft = plan_run(run("sft", 2), SMOL, "cuda")
    assert dpo.components["activations"] == 2 * sft.components["activations"]
    assert dpo.components["adapter_weights"] == sft.components["adapter_weights"]
    assert dpo.components["base_weights"] == sft.components["base_weights"]


@pytest.mark.parametrize("dtype, p", [("float32", 4), ("bfloat16", 2)])
def test_orpo_and_scored_tokens(dtype, p):
    orpo = plan(SMOL, method="lora", batch_size=2, seq_len=64, dtype=dtype, objective="orpo",
                answer_tokens=100, recommend=False)
    assert orpo.components["logits_and_loss"] == 100 * H * p + 4 * 100 * V + (p * 100 * V if p < 4 else 0)
    dpo = plan(SMOL, method="lora", batch_size=2, seq_len=64, dtype=dtype, objective="dpo",
               answer_tokens=100, recommend=False)
    assert dpo.phases == orpo.phases  # the reference forward keeps nothing


def test_orpo_full_fine_tuning_keeps_the_heads_input():
    orpo = plan_run(run("orpo", 2, method="full", dtype="float32"), SMOL, "cuda")
    sft = plan_run(run("sft", 4, method="full", dtype="float32"), SMOL, "cuda")
    assert orpo.components["logits_and_loss"] == 16 * 256 * V + 256 * H * 4
    for key in ("base_weights", "gradients", "optimizer_states", "activations", "transient"):
        assert orpo.components[key] == sft.components[key], key


def test_sft_plans_are_unchanged_by_the_objective_field():
    assert plan(SMOL, recommend=False) == plan(SMOL, recommend=False, objective="sft")
    assert PlanConfig().tokens == 2048 and PlanConfig(objective="dpo").tokens == 4096


def test_bad_preference_plan_settings_are_named():
    with pytest.raises(ValueError) as e:
        plan(SMOL, objective="kto", recommend=False)
    assert "objective 'kto' is not one of sft, dpo, orpo" in str(e.value)
    with pytest.raises(ValueError) as e:
        plan(SMOL, method="full", objective="dpo", recommend=False)
    assert "objective 'dpo' with method 'full'" in str(e.value)
    with pytest.raises(ValueError) as e:
        plan(SMOL, batch_size=1, seq_len=8, objective="dpo", answer_tokens=17, recommend=False)
    assert "answer_tokens must be at most 2 * batch_size * seq_len = 16, got 17" in str(e.value)
    with pytest.raises(ValueError) as e:
        plan(SMOL, answer_tokens=4, recommend=False)
    assert "answer_tokens=4 is for objective dpo or orpo, not 'sft'" in str(e.value)


def test_memory_plan_line_says_pairs():
    from lorakit.planner import memory_plan_line

    line = memory_plan_line(plan_run(run("dpo", 2), SMOL, "cpu"), 8 << 30, "cpu")
    assert "(batch 2 pairs x 64 tokens)" in line
