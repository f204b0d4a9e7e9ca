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


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("dtype,method,copy", [("bfloat16", "lora", 4), ("float32", "lora", 0),
                                               ("bfloat16", "qlora", 4), ("float32", "qlora", 4)])
def test_dora_plan_adds_exactly_the_documented_terms(dtype, method, copy, dropout):
    arch = Architecture("one", 256, 512, 3, 4, 2, 64, 1000, False)
    kw = {"method": method, "rank": 8, "targets": "all-linear", "dtype": dtype, "batch_size": 2, "seq_len": 64,
          "lora_dropout": dropout, "recommend": False}
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
    # saved for backward: the (tokens, out) product the magnitude scales, in the compute dtype; with
    # dropout also the dropped input (tokens, in), in the adapters' dtype (float32), kept instead of
    # the input: the one q/k/v share and the one gate/up share are no longer kept (o_proj's and
    # down_proj's inputs are kept by SDPA and the lean MLP either way)
    ins = sum(i for _, i, _ in modules) if dropout else 0
    inputs = 2 * p * arch.hidden_size if dropout else 0
    assert dora.activations_without_checkpointing - lora.activations_without_checkpointing \
        == layers * tokens * (p * outs + 4 * ins - inputs)
    # the weight norm, W + ΔW never formed: a float32 copy of a 16-bit / NF4 base, three (out, r) products
    norm = max(copy * i * o + 12 * o * dora.config.rank for _, i, o in modules)
    assert memory.dora_norm_bytes(arch, dora.config) == norm
    assert memory.transient_bytes(arch, dora.config) - memory.transient_bytes(arch, lora.config) == norm
    assert memory.dora_norm_bytes(arch, lora.config) == 0


def test_dora_from_the_run_config():
    run = RunConfig.from_dict({"lora": {"dora": True}})
    plain = RunConfig.from_dict({})
    arch = Architecture("one", 256, 512, 3, 4, 2, 64, 1000, False)
    assert plan_run(run, arch, "cpu").config.dora and not plan_run(plain, arch, "cpu").config.dora
    assert plan_run(run, arch, "cpu").peak > plan_run(plain, arch, "cpu").peak


# --- PiSSA at start-up: the SVD of every adapted weight (lora.init=pissa) -----------------------------

TINY = Architecture("one", 256, 512, 3, 4, 2, 64, 1000, False)  # q, o 256x256; k, v 128x256; gate, up 512x256


def test_pissa_svd_flops_by_hand():
    # full SVD, M = 512 >= N = 256: 6*M*N^2 + 20*N^3 (the R-SVD count), either orientation
    assert memory.svd_flops(512, 256, 8) == memory.svd_flops(256, 512, 8) == 201_326_592 + 335_544_320
    # randomized, q = 8, niter 2: 6 products 2*M*N*q (12,582,912), 3 QRs of 512x8 (130,389 each), 2 of
    # 256x8 (64,853 each), the SVD of the 8x256 block (98,304 + 10,240) and U = Q U_B (65,536)
    assert memory.svd_flops(512, 256, 8, niter=2) == 12_582_912 + 3 * 130_389 + 2 * 64_853 + 108_544 + 65_536
    assert memory.qr_flops(512, 8) == 130_389  # 4*512*64 - 4*512/3, rounded down


def test_pissa_plan_counts_every_svd():
    p = plan(TINY, rank=8, targets="all-linear", init="pissa", dtype="float32", recommend=False)
    # 3 layers; (out, in, count), largest first
    assert p.init_svds == ((512, 256, 6), (256, 512, 3), (256, 256, 6), (128, 256, 6))
    # per layer: gate, up, down 536,870,912 each, q, o 436,207,616, k, v 67,108,864 (full SVDs), plus
    # the residual W - (s B) A: 2*out*in*r + out*in = 17*out*in
    svds = 3 * 536_870_912 + 2 * 436_207_616 + 2 * 67_108_864
    residual = 17 * (3 * 131_072 + 2 * 65_536 + 2 * 32_768)
    assert p.init_flops == 3 * (svds + residual) == 7_881_818_112
    # the largest weight's working memory, 512x256 in float32 here (bfloat16: + the float32 copy of W)
    assert p.init_bytes == 8 * 131_072 + 4 * 256**2 + 4 * 256
    bf16 = plan(TINY, rank=8, targets="all-linear", init="pissa", dtype="bfloat16", recommend=False)
    assert bf16.init_bytes == p.init_bytes + 4 * 131_072
    fast = plan(TINY, rank=8, targets="all-linear", init="pissa", pissa_niter=2, dtype="float32", recommend=False)
    assert fast.init_bytes == 8 * 131_072 + 4 * 8 * (512 + 256)
    assert fast.init_flops < p.init_flops / 30
    plain = plan(TINY, rank=8, targets="all-linear", recommend=False)
    assert (plain.init_svds, plain.init_flops, plain.init_bytes) == ((), 0, 0)
    with pytest.raises(ValueError, match=r"init 'svd' is not one of default, gaussian, random, pissa, olora, loftq"):
        plan(TINY, init="svd")
    with pytest.raises(ValueError, match=r"pissa_niter must be an integer >= 0 .* got -1"):
        plan(TINY, init="pissa", pissa_niter=-1)


def allocator_peak_above_now(fn) -> int:
    """The CPU allocator's peak during fn() above what was allocated when it started (torch.profiler's
    memory accounting, as bench/common.py measures steps: monitor.profiled_peak)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lorakit.monitor import profiled_peak

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.empty(16)  # an event at the start: the running total before fn
        fn()
    return profiled_peak(prof)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("niter", [None, 2])
def test_pissa_working_memory_is_measured(dtype, niter):
    # the largest adapted weight of this arch is 96x48 (gate, up; down is 48x96): initialisation.pissa
    # on it, measured on the CPU allocator, against pissa_init_bytes
    import torch

    from lorakit import initialisation

    arch = Architecture("small", 48, 96, 2, 4, 2, 12, 100, False)
    planned = plan(arch, rank=4, targets="all-linear", init="pissa", pissa_niter=niter, dtype=dtype,
                   recommend=False).init_bytes
    for shape in ((96, 48), (48, 96)):
        w = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(getattr(torch, dtype))
        measured = allocator_peak_above_now(lambda w=w: initialisation.pissa(w, 4, 2.0, niter))
        if niter is None:  # LAPACK's own small buffers on top (4 bytes here; 14,404 on 576x576)
            assert 0 <= measured - planned <= 16 * 1024, (shape, measured, planned)
        else:
            assert measured == planned, (shape, measured, planned)


def test_pissa_from_the_run_config():
    run = RunConfig.from_dict({"lora": {"init": "pissa", "pissa_niter": 2}, "train": {"batch_size": 2}})
    plain = RunConfig.from_dict({"train": {"batch_size": 2}})
    cpu, cuda = plan_run(run, TINY, "cpu"), plan_run(run, TINY, "cuda")
    assert (cpu.config.init, cpu.config.pissa_niter) == ("pissa", 2)
    # on the CPU the SVDs share the step's memory: a moment before the first step, weights + working memory
    assert cpu.phases[memory.PISSA_PHASE] == (cpu.components["base_weights"] + cpu.components["adapter_weights"]
                                              + cpu.init_bytes)
    # lorakit train initialises before moving the model to the GPU: no GPU moment, the same GPU peak
    assert memory.PISSA_PHASE not in cuda.phases and cuda.init_bytes == cpu.init_bytes > 0
    assert cuda.peak == plan_run(plain, TINY, "cuda").peak
    assert memory.PISSA_PHASE not in plan_run(plain, TINY, "cpu").phases
    # full fine-tuning has no adapters to initialise
    assert plan_run(RunConfig.from_dict({"method": "full", "lora": {"init": "pissa"}}), TINY, "cpu").init_svds == ()
