"""planner.memory: the formulas (seed figures, parameter counts vs peft, saved tensors vs autograd),
the four moments of a step, FSDP sharding, PlanConfig's checks. Pinned peaks guard the numbers."""

import pytest
import torch

from lorakit.planner import (
    GiB, Architecture, PlanConfig, arch_from_config, fits, plan, trainable_parameters,
)
from lorakit.planner import memory


def test_seed_lora_example_4096_r8():
    # One 4096 x 4096 linear with r = 8: A is 8 x 4096, B is 4096 x 8: 65,536 params, 256x fewer.
    arch = Architecture("one", 4096, 4096, 1, 32, 32, 128, 32000, False)
    n = trainable_parameters(arch, PlanConfig(method="lora", rank=8, targets=("q_proj",)))
    assert n == 65_536
    assert 4096 * 4096 // n == 256


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
    from peft import LoraConfig, get_peft_model

    cfg, model = _tiny_llama()
    arch = arch_from_config(cfg.to_dict())
    assert arch.num_parameters() == sum(p.numel() for p in model.parameters())
    peft_targets = ["q_proj", "v_proj"] if targets is None else (
        list(targets) if isinstance(targets, tuple) else targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=peft_targets))
    measured = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable_parameters(arch, PlanConfig(method="lora", rank=4, targets=targets)) == measured


@pytest.mark.parametrize("rows", ["full", "padded", "packed"])
def test_activation_formula_matches_saved_tensors(rows):
    # Bytes autograd saves in a forward pass with lorakit's loss (unique storages, parameters
    # excluded) equal the plan's activations + what the chunked loss keeps for backward: the
    # gradients of the hidden states at the 62 positions with a target (bf16; the plan counts all
    # T, an upper bound), the (T,) bool mask choosing them, and the head's gradient (V x h,
    # float32). Padded rows
    # (an attention mask): each layer also keeps the (B, 1, T, T) mask and k, v repeated to 4 heads.
    # Packed rows attended example by example (segment attention, as SummedLoss runs them): no mask,
    # each example's output and their concatenation.
    import contextlib

    from lorakit.attention import segment_attention
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
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    extra = {"padded": {"attention_mask": mask}, "full": {},
             "packed": {"position_ids": torch.cat([torch.arange(n) for n in (5, 17, 10)]).repeat(2, 1)}}[rows]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            segment_attention(model) if rows == "packed" else contextlib.nullcontext():
        model_loss(model, input_ids=ids, labels=ids, **extra)
    p = plan(arch_from_config(cfg.to_dict()), method="full", batch_size=2, seq_len=32,
             masked_attention=rows == "padded", segment_attention=rows == "packed", recommend=False)
    # not in the plan: RoPE's cos and sin (bf16, head_dim 16; per row with position ids, else shared)
    # and the final norm's rsqrt (T, 1) float32
    outside = 2 * (2 if rows == "packed" else 1) * 32 * 16 * 2 + 64 * 4
    expected = p.activations_without_checkpointing + 2 * 31 * 64 * 2 + 2 * 32 + 500 * 64 * 4 + outside
    assert sum(saved.values()) == expected


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


# Peaks and moments as the single-module planner (before the package, commit 65e137b) computed them:
# the split into one function per part of the step changed no number. The two LoRA rows without
# checkpointing since gated_mlp (add_lora's MLPs keep gate and up only: 2*p*I per token instead of
# 3*p*I plus down's input, measured by bench/plan_vs_measured.py rows 2 and 4 within 0.3%). The four
# 16-bit llama-3.1 rows' "backward start" since the chunked loss turns its float32 logits into the
# softmax in place (loss._exp_shifted; no logsumexp temporary): one chunk's 8*C*V became (4 + p)*C*V,
# 2 * 256 * 128256 bytes less, which moves the first row's peak to "layer backward".
PINNED = [
    ("llama-3.1-8b", {"method": "lora"}, 25948070297, "layer backward",
     {"backward start": 24146485248, "layer backward": 24201142272, "backward end": 16115048448,
      "optimizer step": 16128679936}),
    ("llama-3.1-8b", {"method": "qlora", "grad_checkpointing": True}, 7791967846, "layer backward",
     {"backward start": 6527393792, "layer backward": 6909616128, "backward end": 5756821504,
      "optimizer step": 5770452992}),
    ("llama-3.1-8b", {"method": "full"}, 84854614016, "optimizer step",
     {"backward start": 64759947264, "layer backward": 63426551808, "backward end": 64242089984,
      "optimizer step": 80302612480}),
    ("llama-3.1-70b", {"method": "full", "n_gpus": 8, "grad_checkpointing": True}, 102927343206, "optimizer step",
     {"backward start": 71046189056, "layer backward": 81994317824, "backward end": 79365003264,
      "optimizer step": 97003429888}),
    ("gemma-2-9b", {"method": "lora", "dtype": "fp32", "device": "cpu", "lora_dropout": 0.1}, 88745664102.4,
     "backward start", {"backward start": 88745664102.4, "layer backward": 80885538406.4,
                        "backward end": 37038389248, "optimizer step": 37038651392}),
    ("mixtral-8x7b", {"method": "qlora", "optimizer": "adamw8bit", "targets": "all-linear"}, 44360190771,
     "backward start", {"backward start": 41736495104, "layer backward": 41369493504,
                        "backward end": 24551907328, "optimizer step": 24551907328}),
]


@pytest.mark.parametrize("model, settings, peak, phase, phases", PINNED, ids=[f"{m} {s}" for m, s, *_ in PINNED])
def test_pinned_peaks(model, settings, peak, phase, phases):
    p = plan(model, recommend=False, **settings)
    assert (p.peak, p.peak_phase, p.phases) == (peak, phase, phases)


def test_components_are_the_per_part_functions():
    arch = plan("qwen2.5-7b", recommend=False).arch
    for config in (PlanConfig(method="qlora", targets="all-linear", batch_size=2, seq_len=512),
                   PlanConfig(method="full", grad_checkpointing=True, device="cpu"),
                   PlanConfig(method="lora", n_gpus=4, lora_dropout=0.1)):
        p = plan(arch, config, recommend=False)
        assert p.components == {
            "base_weights": memory.base_weight_bytes(arch, config),
            "quant_constants": memory.quant_constant_bytes(arch, config),
            "adapter_weights": memory.adapter_weight_bytes(arch, config),
            "gradients": memory.gradient_bytes(arch, config),
            "optimizer_states": memory.optimizer_state_bytes(arch, config),
            "activations": memory.activation_bytes(arch, config, config.grad_checkpointing),
            "logits_and_loss": memory.logits_bytes(arch, config),
            "transient": max(memory.transient_bytes(arch, config), memory.optimizer_step_bytes(arch, config)),
            "runtime_overhead": memory.runtime_overhead_bytes(config, p.peak_allocated),
        }
        assert p.phases == memory.phase_bytes(arch, config)


def test_backward_end_and_optimizer_step_on_one_gpu_are_the_sums_of_their_parts():
    # W + G and W + G + the step's temporaries (one GPU, LoRA: nothing sharded, nothing tied)
    arch = plan("mistral-7b", recommend=False).arch
    config = PlanConfig(method="lora", targets="all-linear")
    w = sum(f(arch, config) for f in (memory.base_weight_bytes, memory.quant_constant_bytes,
                                      memory.adapter_weight_bytes, memory.optimizer_state_bytes))
    g = memory.gradient_bytes(arch, config)
    phases = memory.phase_bytes(arch, config)
    assert phases["backward end"] == w + g
    assert phases["optimizer step"] == w + g + memory.optimizer_step_bytes(arch, config)
    assert memory.optimizer_step_bytes(arch, config) == memory.trainable_parameters(arch, config) * 4  # foreach
    assert phases["backward start"] == w + memory.activation_bytes(arch, config, False) + memory.logits_bytes(arch, config)


def test_dtype_names_are_lorakits_with_the_short_aliases():
    for short, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        a = plan("llama-3.2-1b", dtype=short, recommend=False)
        b = plan("llama-3.2-1b", dtype=name, recommend=False)
        assert a == b and a.config.dtype == name
    assert PlanConfig(adapter_dtype="bf16").adapter_dtype == "bfloat16"
    assert PlanConfig().dtype == "bfloat16" and PlanConfig().adapter_dtype == "float32"


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
    assert "dtype 'int8' is not one of bf16, fp16, fp32 (or float32, bfloat16, float16)" in msg
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


LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96}


def test_plan_config_bounds():
    with pytest.raises(ValueError, match="rank must be at most 65,536, got 100,000,000; seq_len must be at most "
                                         "16,777,216, got 1,000,000,000"):
        plan(LLAMA, rank=10**8, seq_len=10**9)
    with pytest.raises(ValueError, match=r"masked_attention must be true or false, got 'yes'"):
        plan(LLAMA, masked_attention="yes")
    with pytest.raises(ValueError, match=r"masked_attention and segment_attention are both true"):
        plan(LLAMA, masked_attention=True, segment_attention=True)
