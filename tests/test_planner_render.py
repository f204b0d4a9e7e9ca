"""A plan as JSON (Plan.to_dict) and as text (render_plan, memory_plan_line)."""

import json

from lorakit.planner import GiB, memory_plan_line, plan, render_plan


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


def test_render_states_the_numbers():
    p = plan("llama-3.1-8b", method="qlora", grad_checkpointing=True)
    lines = render_plan(p).splitlines()
    assert lines[0] == ("lorakit plan: llama-3.1-8b  method=qlora dtype=bfloat16 optimizer=adamw batch=1 seq=2048 "
                        "checkpointing=on gpus=1 rank=8")
    assert lines[1] == "parameters: 8,030,261,248 total, 3,407,872 trainable (0.042%), 6,979,321,856 in NF4"
    assert f"  layer backward            {p.phases['layer backward'] / GiB:9.2f} GiB  <- peak" in lines
    assert (f"predicted peak per GPU: {p.peak / GiB:.2f} GiB ({p.peak_allocated / GiB:.2f} allocated + "
            f"{p.runtime_overhead / GiB:.2f} runtime overhead)") in lines
    assert "   24 GiB     yes     yes     yes     yes   RTX 3090/4090, A10G, L4" in lines
    assert "   16 GiB     yes     yes     yes     yes   V100 16GB, T4, RTX 4080" in lines


def test_memory_plan_line():
    p = plan("llama-3.1-8b", method="lora", batch_size=4, seq_len=512, recommend=False)
    assert memory_plan_line(p, 80 * GiB, "cuda") == (f"memory plan: predicted peak {p.peak / GiB:.2f} GiB (batch 4 x "
                                                     "512 tokens) of 80.0 GiB available on cuda")
    sharded = plan("llama-3.1-8b", method="full", n_gpus=4, recommend=False)
    assert memory_plan_line(sharded, 3 * GiB // 2, "cuda") == (
        f"memory plan: predicted peak {sharded.peak / GiB:.2f} GiB (batch 1 x 2048 tokens, sharded over 4 ranks) "
        "of 1.5 GiB available on cuda")


def test_render_pissa_startup_line():
    # 3 layers of 7 linears: 21 SVDs; 7,881,818,112 FLOPs and 1,311,744 working bytes
    # (tests/test_planner_adapters.py::test_pissa_plan_counts_every_svd)
    from lorakit.planner import Architecture

    tiny = Architecture("one", 256, 512, 3, 4, 2, 64, 1000, False)
    kw = {"rank": 8, "targets": "all-linear", "dtype": "float32", "init": "pissa", "recommend": False}
    lines = render_plan(plan(tiny, **kw)).splitlines()
    peak = next(i for i, line in enumerate(lines) if line.startswith("predicted peak per GPU"))
    assert lines[peak + 1] == (
        "PiSSA init: 21 SVDs (full) of W (out x in): 6 x 512x256, 3 x 256x512, 6 x 256x256, 6 x 128x256; "
        "about 7.9 GFLOP (lora.pissa_niter=4, a randomized SVD: about 0.3); 1.3 MiB of float32 working memory "
        "(on the CPU in lorakit train, before the model moves to the device)")
    cpu = plan(tiny, device="cpu", pissa_niter=4, **kw)
    text = render_plan(cpu)
    assert f"  start-up: PiSSA init      {cpu.phases['start-up: PiSSA init'] / GiB:9.2f} GiB" in text.splitlines()
    assert ("PiSSA init: 21 SVDs (randomized, niter 4) of W (out x in): 6 x 512x256, 3 x 256x512, 6 x 256x256, "
            "6 x 128x256; about 0.3 GFLOP; 1.0 MiB of float32 working memory (the start-up moment above)") in text
    d = json.loads(json.dumps(cpu.to_dict()))
    assert d["startup"] == {"init": "pissa", "svds": [[512, 256, 6], [256, 512, 3], [256, 256, 6], [128, 256, 6]],
                            "flops": cpu.init_flops, "working_bytes": 8 * 131_072 + 4 * 8 * (512 + 256)}
    assert "PiSSA" not in render_plan(plan(tiny, rank=8, recommend=False))
    assert plan(tiny, rank=8, recommend=False).to_dict()["startup"] is None
