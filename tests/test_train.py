import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama

from lorakit import monitor
from lorakit.config import RunConfig
from lorakit.data import Record, build_dataset, collate
from lorakit.train import Prepared, checkpoints, lr_lambda, prepare_model, train

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


def test_schedule_warmup_then_cosine():
    config = RunConfig.from_dict({}, ["train.steps=10", "train.warmup_steps=2"])
    f = lr_lambda(config)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)
    f = lr_lambda(RunConfig.from_dict({}, ["train.steps=10", "train.warmup_steps=0", "train.schedule=linear"]))
    assert f(5) == pytest.approx(0.5)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    run_tiny(tmp_path / "full")

    import lorakit.train as t

    real = t.save_checkpoint
    calls = []

    def crash_after_second_checkpoint(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return out

    monkeypatch.setattr(t, "save_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "cut")
    monkeypatch.setattr(t, "save_checkpoint", real)
    assert curve(tmp_path / "cut")[-1][0] == 8
    summary = run_tiny(tmp_path / "cut", resume=True)
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["tokens_seen"] == full["tokens_seen"]
    assert summary["after"]["val_loss"] == full["after"]["val_loss"]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_train import tiny_run
    import lorakit.train as t
    real = t.save_checkpoint
    def slow(*a, **k):
        out = real(*a, **k)
        print("checkpoint", out.name, flush=True)
        time.sleep(0.3)  # a window for the kill after the checkpoint
        return out
    t.save_checkpoint = slow
    config, prepared = tiny_run(["train.steps=24"])
    t.train(config, sys.argv[1], resume=len(sys.argv) > 2, prepared=prepared, progress=False, log=lambda *_: None)
    print("done", flush=True)
""")


def test_kill_9_then_resume_reproduces_the_curve(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "cut")], stdout=subprocess.PIPE,
                            text=True, env=env)
    for line in proc.stdout:
        if line.startswith("checkpoint step-12"):
            break
    time.sleep(0.15)  # somewhere between checkpoint 12 and 16
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert checkpoints(tmp_path / "cut")[-1][0] in (12, 16)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "cut"), "resume"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.stdout.strip().endswith("done"), done.stderr[-2000:]
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "full")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")
    assert len(curve(tmp_path / "full")) == 24


DESTROYABLE = ["lora.targets=[q_proj,v_proj,lm_head]", "train.save_every=2", "eval.every=0"]


def destroy_adapter_at(monkeypatch, at_step):
    """Before checkpoint `at_step` is written, fill every lora_B with N(0, 10^2) noise: the saved
    checkpoint and the model that trains on hold a destroyed adapter (the one on the output head
    sends the loss to ~68 nats), and the next step's loss shoots up."""
    import lorakit.train as t

    real = t.save_checkpoint

    def save(run_dir, step, model, *args, **kwargs):
        if step == at_step:
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(10 * torch.randn(p.shape, generator=g))
        return real(run_dir, step, model, *args, **kwargs)

    monkeypatch.setattr(t, "save_checkpoint", save)


def test_divergence_keeps_the_last_checkpoint_judged_good(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    destroy_adapter_at(monkeypatch, 6)
    summary = run_tiny(tmp_path, DESTROYABLE)
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


def test_divergence_with_no_good_checkpoint_writes_no_adapter(tmp_path, monkeypatch):
    destroy_adapter_at(monkeypatch, 2)
    summary = run_tiny(tmp_path, DESTROYABLE)
    assert [(d["kind"], d["step"]) for d in summary["diagnostics"]] == [("diverged", 3)]
    assert summary["result"] is None and summary["after"] is None and summary["steps"] == 0
    assert summary["no_result"].startswith("no checkpoint of this run is better than the start")
    assert not (tmp_path / "adapter").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["no_result"] == summary["no_result"]


def test_before_after_table_keeps_columns_apart():
    from lorakit.train import before_after_table

    table = before_after_table({"val_loss": 2.8, "val_ppl": 16.44}, {"val_loss": 28.1, "val_ppl": math.exp(50)})
    assert table.splitlines() == [
        "                         before       after",
        "held-out loss            2.8000     28.1000",
        "held-out perplexity       16.44   5.185e+21",
    ]


def test_collapse_is_not_a_plateau(tmp_path):
    """lr 1e3 on the tiny model: after warm-up the outputs saturate, the gradient norm drops to 0
    and the loss stays at ln(vocab size). Not "the learning rate is too small"."""
    summary = run_tiny(tmp_path, ["train.lr=1e3", "train.steps=12", "eval.every=0"])
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


def test_heldout_loss_without_a_token_to_score_is_an_error():
    from lorakit.train import heldout_loss

    tok = char_tokenizer()
    rows = [Record({"prompt": "<abcdef>=", "completion": "fedcba"}, "mem:0")]
    dataset = build_dataset(rows, tok, max_length=5)  # the answer is truncated away
    assert dataset.supervised_tokens == 0
    with pytest.raises(ValueError, match="none of the 1 held-out examples has a token to score"):
        heldout_loss(tiny_llama(vocab=len(tok)), dataset, 0, 8)


def test_plateau_diagnosis_on_synthetic_curves():
    steps = list(range(1, 31))
    flat = [3.0 - 0.5 * min(s, 10) / 10 for s in steps]  # falls to 2.5, then flat
    d = monitor.check_plateau(steps, flat, r=2, lr=1e-5)
    assert d.kind == "plateau" and "rank (r=2) may be too low" in d.message and "(1e-05) too small" in d.message
    learning = [3.0 * 0.9 ** s for s in steps]
    assert monitor.check_plateau(steps, learning, r=2, lr=1e-3) is None
    converged = [3.0 * 0.5 ** min(s, 10) for s in steps]  # flat, but far below the start
    assert monitor.check_plateau(steps, converged, r=2, lr=1e-3) is None
    assert monitor.check_divergence(5, float("nan"), 1.0, 1e-3, True).kind == "diverged"
    assert monitor.check_divergence(5, 3.5, 1.0, 1e-3, True) is not None
    assert monitor.check_divergence(5, 1.4, 0.45, 1e-3, True) is None  # 3.1x, but only 0.95 nats up
    assert monitor.check_divergence(18, 0.0198, 0.0042, 1e-3, True) is None  # noise near convergence
    assert monitor.check_divergence(5, 3.5, 1.0, 1e-3, False) is None  # warm-up spikes are tolerated


def test_tiny_learning_rate_is_diagnosed_as_plateau(tmp_path):
    summary = run_tiny(tmp_path, ["train.lr=1e-7", "train.steps=12"])
    assert [d["kind"] for d in summary["diagnostics"]] == ["plateau"]


def test_no_loss_on_prompt_tokens():
    config, prepared = tiny_run()
    model = prepared.model
    batch = collate(prepared.train.examples[:4], 0)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits.detach().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                             ignore_index=-100)
    loss.backward()
    prompt_len = len("<abcd>=")
    # positions 0..prompt_len-2 predict prompt tokens 1..prompt_len-1: no gradient reaches them
    assert logits.grad[:, : prompt_len - 1].abs().sum() == 0
    assert logits.grad[:, prompt_len - 1].abs().sum() > 0  # the first completion token is learned
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, loss)


def test_summed_loss_head_only_at_targets_equals_full_logits():
    from lorakit.train import SummedLoss

    config, prepared = tiny_run()
    model = prepared.model
    batch = collate(prepared.train.examples[:6], 0)
    fast = SummedLoss(model)
    assert fast.chunked
    loss = fast(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                            ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-5)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6)


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
