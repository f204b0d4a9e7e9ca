"""Data-parallel training with torchrun on CPU (gloo): 2 processes equal 1 process with the same
global batch."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import monitor

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_train import tiny_run
    from lorakit.train import train
    out, resume, *overrides = sys.argv[1:]
    config, prepared = tiny_run(["lora.dropout=0.0", *overrides])
    train(config, out, resume=resume == "resume", prepared=prepared, progress=False, log=lambda *_: None)
""")


def run(tmp_path, out, nproc, overrides=(), resume=False):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / out), "resume" if resume else "fresh", *overrides]
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / out


def curve(run_dir):
    return [(r["step"], r["loss"]) for r in monitor.MetricsLog(run_dir / "metrics.jsonl").read()
            if r["type"] == "train"]


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_run(a, b):
    ca, cb = curve(a), curve(b)
    assert [s for s, _ in ca] == [s for s, _ in cb] and len(ca) == 12
    for (_, la), (_, lb) in zip(ca, cb):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    single = run(tmp_path, "single", 1, ["train.batch_size=8", "train.grad_accum=2"])
    ddp = run(tmp_path, "ddp", 2, ["train.batch_size=4", "train.grad_accum=2"])
    assert_same_run(single, ddp)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["tokens_seen"] == json.loads((single / "summary.json").read_text())["tokens_seen"]
    # only rank 0 wrote: one line per step, no duplicates
    assert len([r for r in monitor.MetricsLog(ddp / "metrics.jsonl").read() if r["type"] == "train"]) == 12


def test_resume_with_two_processes(tmp_path):
    # a constant schedule: the learning rate of a step does not depend on train.steps
    full = run(tmp_path, "full", 2, ["train.batch_size=4", "train.schedule=constant"])
    cut = run(tmp_path, "cut", 2, ["train.batch_size=4", "train.schedule=constant", "train.steps=6"])
    import shutil

    shutil.rmtree(cut / "adapter")
    (cut / "summary.json").unlink()
    run(tmp_path, "cut", 2, ["train.batch_size=4", "train.schedule=constant"], resume=True)
    assert_same_run(full, cut)
