"""bench/gpu_check.sh's dry run (what runs without a GPU): exit status 0, the table, the JSON it
writes and its last line, and the CUDA tests it would run, found by reading tests/."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ["lorakit LoRA", "peft LoRA", "lorakit QLoRA", "peft+bnb QLoRA"]
RATIOS = {"lora_tokens_per_s_ratio", "lora_peak_memory_ratio", "qlora_tokens_per_s_ratio", "qlora_peak_memory_ratio",
          "dequantize_throughput_ratio", "tests_failed", "dry_run"}


def installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_dry_run_exits_0_and_writes_the_table_as_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    args = ["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out)] + ([] if not torch.cuda.is_available()
                                                                        else ["--dry-run"])
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == ("no CUDA device: dry run on the CPU (a shrunken config, one step of each contender; the CUDA "
                        "tests are listed, not run)" if not torch.cuda.is_available() else "dry run (--dry-run)")
    report = json.loads(out.read_text())
    assert json.loads(lines[-1]) == report["ratios"] and set(report["ratios"]) == RATIOS
    assert report["dry_run"] is True and report["ratios"]["dry_run"] is True
    assert report["model"]["parameters"] == 106_816  # the shrunken Llama: 64 hidden, 2 layers, vocab 256
    assert [r["name"] for r in report["steps"]] == CONTENDERS
    for row in report["steps"]:
        needs = ["peft", "bitsandbytes"] if "bnb" in row["name"] else ["peft"] if "peft" in row["name"] else []
        absent = [n for n in needs if not installed(n)]
        assert row["status"] == (f"not installed: {', '.join(absent)}" if absent else "ok"), row
        if row["status"] == "ok":
            assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["median_s"])
            assert row["peak_memory_bytes"] > 0 and row["min_s"] <= row["median_s"] <= row["max_s"]
    # LoRA's B starts at 0: lorakit's and peft's first loss is the base model's, the same number
    first = {r["name"]: r["first_step_loss"] for r in report["steps"] if r["status"] == "ok"}
    if "peft LoRA" in first:
        assert first["lorakit LoRA"] == pytest.approx(first["peft LoRA"], rel=1e-2)
        steps = {r["name"]: r for r in report["steps"]}
        assert report["ratios"]["lora_peak_memory_ratio"] == round(
            steps["lorakit LoRA"]["peak_memory_bytes"] / steps["peft LoRA"]["peak_memory_bytes"], 3)
    assert [r["name"] for r in report["dequantize"]] == ["dequantize lorakit", "dequantize bnb"]
    if installed("bitsandbytes"):
        assert report["dequantize"][1]["same_packed_bytes"] is True  # the same NF4 bytes: like for like
    assert report["tests"]["ran"] is False and report["ratios"]["tests_failed"] is None
    table = [line for line in lines if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in table[1:]] == CONTENDERS + ["dequantize lorakit", "dequantize bnb"]


def test_the_cuda_subset_is_every_test_skipped_without_cuda(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text(
        "import pytest, torch\n\n@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')\n"
        "@pytest.mark.parametrize('n', [1, 2])\ndef test_on_gpu(n):\n    pass\n\n\ndef test_anywhere():\n    pass\n")
    (tmp_path / "tests" / "test_b.py").write_text(
        "import pytest, torch\npytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='CUDA')\n")
    assert gpu_check.cuda_tests(tmp_path / "tests") == ["tests/test_a.py::test_on_gpu", "tests/test_b.py"]
    assert "tests/test_nf4.py::test_cuda_matches_cpu" in gpu_check.cuda_tests()


def test_the_cuda_tests_are_counted_from_pytests_report():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "bench"))
    ids = gpu_check.cuda_tests()
    result = gpu_check.run_tests(ids)
    n = len(ids)
    if torch.cuda.is_available():
        assert (result["passed"], result["failed"], result["error"], result["rc"]) == (n, 0, 0, 0)
    else:  # each one skips itself without CUDA
        assert (result["passed"], result["skipped"], result["failed"], result["rc"]) == (0, n, 0, 0)
