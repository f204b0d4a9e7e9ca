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
