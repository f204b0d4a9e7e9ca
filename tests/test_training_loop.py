"""The training loop end to end on a tiny seeded model: the loss falls, runs are bit for bit
reproducible, a resumed (or killed and resumed) run reproduces the uninterrupted curve, and the
diagnostics (divergence, collapse, plateau, broken start) fire as they should."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit import monitor
from lorakit.config import RunConfig
from lorakit.data import Record, build_dataset, collate
from lorakit.training import Hooks, Prepared, train
from lorakit.training.checkpoint import checkpoints
from lorakit.training.setup import prepare_model

ROOT = Path(__file__).resolve().parents[1]


def reverse_task(n, seed=0):
    """prompt "<abc>=" -> completion "cba": learnable by a tiny model in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        word = "".join(chr(97 + int(c)) for c in torch.randint(0, 6, (4,), generator=g))
        rows.append(Record({"prompt": f"<{word}>=", "completion": word[::-1]}, f"mem:{i}"))
    return rows


def tiny_run(overrides=(), n_train=64):
    config = RunConfig.from_dict({}, [
        "data.train=unused.jsonl", "train.steps=12", "train.batch_size=8", "train.lr=0.02",
        "train.warmup_steps=2", "train.log_every=1", "train.save_every=4", "eval.every=4",
        "eval.max_new_tokens=6", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", *overrides])
    tok = char_tokenizer()
    model = prepare_model(tiny_llama(vocab=len(tok), init_range=0.1), config)
    train_set = build_dataset(reverse_task(n_train), tok)
    val = build_dataset(reverse_task(16, seed=1), tok)
    test = build_dataset(reverse_task(8, seed=2), tok)
    return config, Prepared(model, tok, train_set, val, test)


def run_tiny(run_dir, overrides=(), **kwargs):
    config, prepared = tiny_run(overrides)
    return train(config, run_dir, prepared=prepared, progress=False, log=lambda *_: None, **kwargs)


def curve(run_dir):
    return [(r["step"], r["loss"]) for r in monitor.MetricsLog(Path(run_dir) / "metrics.jsonl").read()
            if r["type"] == "train"]


def test_without_a_bar_each_logged_step_is_a_log_line_of_its_metrics(tmp_path):
    # progress=False (`lorakit train --no-progress`): a log shows the run's progress as lines, every
    # train.log_every steps, with the numbers metrics.jsonl holds for those steps
    config, prepared = tiny_run(["train.steps=6", "train.log_every=2", "eval.every=0"])
    lines = []
    train(config, tmp_path / "run", prepared=prepared, progress=False, log=lines.append)
    records = [r for r in monitor.MetricsLog(tmp_path / "run" / "metrics.jsonl").read() if r["type"] == "train"]
    assert [r["step"] for r in records] == [2, 4, 6]
    steps = [line for line in lines if line.startswith("step ")]
    assert steps == [f"step {r['step']}/6: loss {r['loss']:.4f}, lr {r['lr']:.2e}, grad norm {r['grad_norm']:.3g}, "
                     f"{r['tokens_per_s']:,.0f} tokens/s, {r['train_seconds']:.0f} s" for r in records]


def test_loss_curve_is_deterministic_and_decreases(tmp_path):
    s1 = run_tiny(tmp_path / "a")
    s2 = run_tiny(tmp_path / "b")
    c1, c2 = curve(tmp_path / "a"), curve(tmp_path / "b")
    assert c1 == c2 and len(c1) == 12  # bit-identical
    smoothed = monitor.smooth([loss for _, loss in c1])
    assert smoothed[-1] < smoothed[0] - 0.5
    assert s1["after"]["val_loss"] < s1["before"]["val_loss"]
    assert s1["tokens_seen"] == s2["tokens_seen"] == sum(
        int(collate(b, 0)["attention_mask"].sum()) for b in _batches(tiny_run()[1], 12))
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "summary.json", "loss.png"):
        assert (tmp_path / "a" / name).is_file(), name
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["diagnostics"] == []
    assert [p.name for _, p in checkpoints(tmp_path / "a")] == ["step-4", "step-8"]


def _batches(prepared, steps):
    from lorakit.data import batch_at

    return [batch_at(prepared.train, s, 8, 0) for s in range(steps)]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    run_tiny(tmp_path / "full")
    saved = []

    def crash_after_second_checkpoint(step, path):
        saved.append(path)
        if len(saved) == 2:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "cut", hooks=Hooks(after_checkpoint=crash_after_second_checkpoint))
    assert curve(tmp_path / "cut")[-1][0] == 8
    summary = run_tiny(tmp_path / "cut", resume=True)
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["tokens_seen"] == full["tokens_seen"]
    assert summary["after"]["val_loss"] == full["after"]["val_loss"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_training_loop import tiny_run
    from lorakit.training import train
    out, mode = sys.argv[1:]  # mode: "stop" (wait at step 14 for the kill), "resume" or "full"
    def log(line):
        if mode == "stop" and line.startswith("step 14/"):  # two steps past checkpoint 12
            print("at step 14", flush=True)
            time.sleep(10**6)
    config, prepared = tiny_run(["train.steps=24"])
    train(config, out, resume=mode == "resume", prepared=prepared, progress=False, log=log)
    print("done", flush=True)
""")


def test_kill_9_then_resume_reproduces_the_curve(forkserver, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cut"), "stop"], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert "at step 14\n" in proc.stdout  # blocks until the run waits there (or ends, failing)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoints(tmp_path / "cut")[-1][0] == 12
    assert curve(tmp_path / "cut")[-1][0] == 14  # steps past the checkpoint, which the resumed run replaces
    done = forkserver.run(tmp_path / "cut", "resume", script=script)
    assert done.stdout.strip().endswith("done"), done.stderr[-2000:]
    done = forkserver.run(tmp_path / "full", "full", script=script)
    assert done.stdout.strip().endswith("done"), done.stderr[-2000:]
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    assert len(curve(tmp_path / "full")) == 24


DESTROYABLE = ["lora.targets=[q_proj,v_proj,lm_head]", "train.save_every=2", "eval.every=0"]


def destroy_adapter_at(at_step):
    """Hooks that, before checkpoint `at_step` is written, fill every lora_B with N(0, 10^2) noise:
    the saved checkpoint and the model that trains on hold a destroyed adapter (the one on the
    output head sends the loss to ~68 nats), and the next step's loss shoots up."""

    def destroy(step, model):
        if step == at_step:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(10 * torch.randn(p.shape, generator=g))

    return Hooks(before_checkpoint=destroy)


def test_divergence_keeps_the_last_checkpoint_judged_good(tmp_path):
    from safetensors.torch import load_file

    summary = run_tiny(tmp_path, DESTROYABLE, hooks=destroy_adapter_at(6))
    (diag,) = summary["diagnostics"]
    assert (diag["kind"], diag["step"]) == ("diverged", 7) and "rose far above its best" in diag["message"]
    # step-6 holds the destroyed adapter (its held-out loss is above the base's): step-4 is kept
    assert [s for s, _ in checkpoints(tmp_path)] == [4, 6]
    assert summary["steps"] == 4 and summary["no_result"] is None
    assert summary["after"]["val_loss"] < summary["before"]["val_loss"]
    kept = load_file(tmp_path / "checkpoints" / "step-4" / "trainable.safetensors")
    written = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    assert torch.equal(written["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], kept[key])


def test_divergence_with_no_good_checkpoint_writes_no_adapter(tmp_path):
    summary = run_tiny(tmp_path, DESTROYABLE, hooks=destroy_adapter_at(2))
    assert [(d["kind"], d["step"]) for d in summary["diagnostics"]] == [("diverged", 3)]
    assert summary["result"] is None and summary["after"] is None and summary["steps"] == 0
    assert summary["no_result"].startswith("no checkpoint of this run is better than the start")
    assert not (tmp_path / "adapter").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["no_result"] == summary["no_result"]


def test_collapse_is_not_a_plateau(tmp_path):
    """lr 1e3 on the tiny model: after warm-up the outputs saturate, the gradient norm drops to 0
    and the loss stays at ln(vocab size). Not "the learning rate is too small".

    With eager attention: on saturated scores PyTorch's CPU flash attention backward (sdpa) returns
    NaN on some CPUs (an AVX2 host; not on AVX-512 ones), which makes the same run "diverged"
    there; with the softmax written out the gradients saturate to exact zeros (collapsed at lr 1e2,
    1e3 and 1e4 on that host, as on the AVX-512 ones with sdpa)."""
    config, prepared = tiny_run(["train.lr=1e3", "train.steps=12", "eval.every=0"])
    prepared.model.set_attn_implementation("eager")
    summary = train(config, tmp_path, prepared=prepared, progress=False, log=lambda *_: None)
    (diag,) = summary["diagnostics"]
    assert diag["kind"] == "collapsed" and f"the gradient norm is 0 since step {diag['step']}" in diag["message"]
    assert "too small" not in diag["message"] and "too high" not in diag["message"]
    norms = [r["grad_norm"] for r in monitor.MetricsLog(tmp_path / "metrics.jsonl").read() if r["type"] == "train"]
    assert norms[diag["step"] - 2] > 0 and norms[diag["step"] - 1:] == [0.0] * (13 - diag["step"])


def test_nan_loss_before_any_update_blames_the_weights_not_the_learning_rate(tmp_path):
    config, prepared = tiny_run()
    with torch.no_grad():
        prepared.model.model.layers[1].mlp.up_proj.base_layer.weight[0, 0] = float("nan")
    summary = train(config, tmp_path, prepared=prepared, progress=False, log=lambda *_: None)
    (diag,) = summary["diagnostics"]
    assert (diag["kind"], diag["step"]) == ("broken_start", 1)
    assert "before any update, so the learning rate plays no part" in diag["message"]
    assert "1 of the model's weight tensors hold NaN or inf, e.g. model.layers.1.mlp.up_proj.base_layer.weight" \
        in diag["message"]
    assert "too high" not in diag["message"] and summary["result"] is None


def test_tiny_learning_rate_is_diagnosed_as_plateau(tmp_path):
    summary = run_tiny(tmp_path, ["train.lr=1e-7", "train.steps=12"])
    assert [d["kind"] for d in summary["diagnostics"]] == ["plateau"]


def test_gradient_checkpointing_gives_the_same_curve(tmp_path):
    run_tiny(tmp_path / "plain", ["lora.dropout=0.0", "train.steps=4", "eval.every=0"])
    run_tiny(tmp_path / "ckpt", ["lora.dropout=0.0", "train.steps=4", "eval.every=0",
                                 "train.gradient_checkpointing=true"])
    for (sa, la), (sb, lb) in zip(curve(tmp_path / "plain"), curve(tmp_path / "ckpt"), strict=True):
        assert sa == sb and la == pytest.approx(lb, rel=1e-5)


def test_grad_accumulation_weights_every_token_equally(tmp_path):
    """2 micro-batches of 4 = 1 batch of 8: the step loss is the mean over all supervised tokens."""
    run_tiny(tmp_path / "one", ["lora.dropout=0.0", "train.steps=4", "eval.every=0", "train.batch_size=8"])
    run_tiny(tmp_path / "acc", ["lora.dropout=0.0", "train.steps=4", "eval.every=0", "train.batch_size=4",
                                "train.grad_accum=2"])
    one, acc = curve(tmp_path / "one"), curve(tmp_path / "acc")
    assert [s for s, _ in one] == [s for s, _ in acc]
    for (_, la), (_, lb) in zip(one, acc):
        assert la == pytest.approx(lb, rel=1e-5)
