import json

import pytest
import torch
from conftest import tiny_llama

from lorakit import LoraConfig, add_lora, save_adapter
from lorakit.cli import main


def test_inspect_reports_counts_sizes_and_norms(tmp_path, capsys):
    model = add_lora(tiny_llama(), LoraConfig(r=4, alpha=8, targets=["q_proj"], init="random",
                                              rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}))
    save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"] == 4 * (32 + 32) + 2 * (32 + 32)
    files = ("adapter_config.json", "adapter_model.safetensors")
    assert report["bytes"] == sum((tmp_path / f).stat().st_size for f in files)
    layer1 = model.model.layers[1].self_attn.q_proj
    m1 = report["modules"][1]
    assert (m1["module"], m1["r"], m1["scale"]) == ("model.layers.1.self_attn.q_proj", 2, 4.0)
    assert m1["norm_delta"] == pytest.approx(torch.linalg.matrix_norm(layer1.delta_weight("default")).item(), rel=1e-6)
    assert m1["norm_A"] == layer1.lora_A["default"].weight.norm().item()

    assert main(["inspect", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "parameters               384" in text and "model.layers.1.self_attn.q_proj" in text


def test_inspect_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "none")]) == 2
    assert "no adapter_config.json" in capsys.readouterr().err
