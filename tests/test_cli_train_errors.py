"""`lorakit train` meeting bad inputs and faults, as a user runs it (a process of its own, forked
from one that imported lorakit once: tests/processes.py): a `lorakit train: error: ...` message, a
non-zero exit, no traceback, and no user file changed."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import char_tokenizer, tiny_llama

ERROR = "lorakit train: error: "


def reverse_rows(n, seed=0, exclude=()):
    """n reverse-task records whose words are not in `exclude` (held-out rows: no prompt of the
    training data, which the data check would stop a run for as leakage)."""
    import random

    rng = random.Random(seed)
    words = []
    while len(words) < n:
        word = "".join(rng.choice("abcdef") for _ in range(4))
        if f"<{word}>=" not in exclude:
            words.append(word)
    return [{"prompt": f"<{w}>=", "completion": w[::-1]} for w in words]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory (hidden size 64) and reverse-task data, as `lorakit train` reads them."""
    root = tmp_path_factory.mktemp("inputs")
    tok = char_tokenizer()
    tiny_llama(hidden=64, vocab=len(tok), init_range=0.1).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    train = write_jsonl(root / "train.jsonl", reverse_rows(32))
    seen = {json.loads(line)["prompt"] for line in train.read_text().splitlines()}
    write_jsonl(root / "val.jsonl", reverse_rows(8, seed=1, exclude=seen))
    write_jsonl(root / "test.jsonl", reverse_rows(4, seed=2, exclude=seen))
    return root


def settings(files, **changes):
    """--set arguments for a 4-step run on the tiny model (changes: {"train.lr": 1e-3, ...})."""
    values = {"model.path": files / "model", "data.train": files / "train.jsonl",
              "data.validation": files / "val.jsonl", "data.test": files / "test.jsonl",
              "train.steps": 4, "train.batch_size": 8, "train.save_every": 2, "train.warmup_steps": 1,
              "eval.every": 0, "eval.max_new_tokens": 3, "lora.r": 4, **changes}
    return [a for k, v in values.items() if v is not None for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def lorakit(forkserver):
    """lorakit(*args, cwd=None, limit_file_bytes=None): `lorakit train --no-progress ARGS` as a user
    runs it, a subprocess.CompletedProcess. limit_file_bytes: a file system that is full after that
    many bytes per file (EFBIG)."""
    def run(*args, cwd=None, limit_file_bytes=None):
        return forkserver.run("train", "--no-progress", *args, cwd=cwd, limit_file_bytes=limit_file_bytes)

    return run


def assert_error(done, *fragments):
    assert done.returncode != 0, done.stdout[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert ERROR in done.stderr, done.stderr[-3000:]
    message = done.stderr[done.stderr.index(ERROR):]
    for fragment in fragments:
        assert fragment in message, message
    return message


def snapshot(path):
    """Every file and link under path: its bytes (or link target) and mode."""
    out = {}
    for parent, dirs, names in os.walk(path):
        for name in dirs + names:
            p = Path(parent) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_file():
                out[rel] = (p.read_bytes(), p.stat().st_mode)
            else:
                out[rel] = ("dir", p.stat().st_mode)
    return out


@pytest.fixture(scope="module")
def finished_run(lorakit, files, tmp_path_factory):
    """A 4-step run (checkpoint step-2) to resume from, copied by each test that changes it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    done = lorakit("--out", out, *settings(files))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def copy_run(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


# --- the run directory -----------------------------------------------------------------------------

def test_out_that_is_not_a_run_is_refused(lorakit, files, tmp_path):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "summary.json").write_text("my own notes\n")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "adapter" / "keep.txt").write_text("keep\n")
    before = snapshot(out)
    done = lorakit("--out", out, *settings(files))
    assert_error(done, f"run directory {out} is not empty and is not a lorakit run (it holds adapter, "
                       "metrics.jsonl, summary.json)", "nothing was changed")
    assert snapshot(out) == before


def test_out_that_is_a_file_is_refused(lorakit, files, tmp_path):
    (tmp_path / "out").write_text("a file\n")
    assert_error(lorakit("--out", tmp_path / "out", *settings(files)), f"run directory {tmp_path / 'out'} is a file")
    assert (tmp_path / "out").read_text() == "a file\n"
    # below a file: the directory cannot be made, said before the model loads
    done = lorakit("--out", tmp_path / "out" / "run", *settings(files))
    assert_error(done, f"cannot write the run directory {tmp_path / 'out' / 'run'} (Not a directory)")
    assert "model:" not in done.stdout


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_out_and_default_runs_in_a_read_only_cwd(lorakit, files, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        done = lorakit("--out", tmp_path / "ro", *settings(files))
        assert_error(done, f"cannot write the run directory {tmp_path / 'ro'} (Permission denied)")
        done = lorakit(*settings(files), cwd=tmp_path / "ro")
        assert_error(done, "cannot write the run directory runs/", "(Permission denied)")
        assert "model:" not in done.stdout  # before the model loads
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_symlink_in_the_run_directory_is_never_followed(lorakit, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.txt").write_text("mine\n")
    shutil.rmtree(run / "adapter")
    (run / "adapter").symlink_to(elsewhere)
    before, outside = snapshot(run), snapshot(elsewhere)
    done = lorakit("--resume", run)
    assert_error(done, f"{run / 'adapter'} is a symbolic link (to {elsewhere}); lorakit never writes through a link")
    assert snapshot(run) == before and snapshot(elsewhere) == outside


def test_a_run_directory_in_use_is_refused_at_once(lorakit, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    before = snapshot(run)
    with open(run / ".lock", "r+") as held:  # what a running `lorakit train` holds
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        done = lorakit("--resume", run)
        assert_error(done, f"{run} is in use by another lorakit train (pid 4242)")
        done = lorakit("--out", run)
        assert_error(done, f"{run} is in use by another lorakit train (pid 4242)")
        held.seek(0)
        held.truncate()
        held.write(before[".lock"][0].decode())
    assert snapshot(run) == before


def test_lock_of_a_killed_run_is_free(lorakit, finished_run, tmp_path):
    """flock's lock dies with its process (kill -9 included): the run resumes without a stale lock."""
    run = copy_run(finished_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'r+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
                               str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    assert_error(lorakit("--resume", run), "is in use by another lorakit train")
    holder.kill()
    holder.wait()
    done = lorakit("--resume", run)
    assert done.returncode == 0, done.stderr[-3000:]


# --- resuming --------------------------------------------------------------------------------------

def rewrite_checkpoint(run, change):
    from safetensors.torch import load_file, save_file

    path = run / "checkpoints" / "step-2" / "trainable.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_resume_refuses_a_checkpoint_missing_a_tensor(lorakit, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    rewrite_checkpoint(run, lambda t: t.pop("model.layers.1.mlp.down_proj.lora_A.default.weight"))
    done = lorakit("--resume", run)
    assert_error(done, f"checkpoint {run / 'checkpoints' / 'step-2'} does not match the model being trained: "
                       "missing tensors (1): model.layers.1.mlp.down_proj.lora_A.default.weight")
    assert done.returncode == 2


def test_resume_refuses_a_checkpoint_with_an_extra_tensor(lorakit, finished_run, tmp_path):
    import torch

    run = copy_run(finished_run, tmp_path)
    rewrite_checkpoint(run, lambda t: t.update({"model.norm.extra": torch.zeros(3)}))
    assert_error(lorakit("--resume", run), "tensors the model does not have (1): model.norm.extra")


def test_resume_refuses_a_changed_config(lorakit, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    text = (run / "config.yaml").read_text()
    assert "  r: 4\n" in text
    (run / "config.yaml").write_text(text.replace("  r: 4\n", "  r: 8\n"))
    before = snapshot(run)
    done = lorakit("--resume", run)
    assert_error(done, f"{run / 'config.yaml'} changed since checkpoint step-2 was written (lora.r: 4 -> 8)")
    assert "model:" not in done.stdout and snapshot(run) == before


def test_resume_removes_checkpoints_cut_short_by_a_kill(lorakit, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    (run / "summary.json").unlink()
    half = run / "checkpoints" / ".step-3.1234.abcd"  # a save killed before its rename
    half.mkdir()
    (half / "trainable.safetensors").write_bytes(b"\0" * 10)
    done = lorakit("--resume", run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]


def test_run_files_follow_the_umask(finished_run):
    umask = os.umask(0)
    os.umask(umask)
    modes = {str(p.relative_to(finished_run)): p.stat().st_mode & 0o777
             for p in [finished_run / "checkpoints", *(finished_run / "checkpoints").rglob("*"),
                       *(finished_run / n for n in ("config.yaml", "metrics.jsonl", "summary.json"))]}
    assert modes == {name: (0o777 if (finished_run / name).is_dir() else 0o666) & ~umask for name in modes}


def test_disk_full_during_a_checkpoint_loses_nothing(lorakit, files, tmp_path):
    """Files may not grow past 60 kB (the checkpoint's optimizer.pt needs more): the write fails
    with EFBIG, as on a full disk. The error says so; no half checkpoint is left; the run resumes."""
    run = tmp_path / "run"
    done = lorakit("--out", run, *settings(files), limit_file_bytes=60_000)
    assert_error(done, f"could not write checkpoint step-2 in {run / 'checkpoints'} (",
                 f"Nothing was lost: continue from the start with `lorakit train --resume {run}`")
    assert list((run / "checkpoints").iterdir()) == []
    assert (run / "config.yaml").is_file()
    done = lorakit("--resume", run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


# --- data --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, key, message", [
    ("", "data.train", "data.train: {path}: holds no records (the file is empty or blank)"),
    ("\n  \n\t\n", "data.train", "data.train: {path}: holds no records (the file is empty or blank)"),
    ("", "data.validation", "data.validation: {path}: holds no records"),
    ("\n", "data.test", "data.test: {path}: holds no records"),
])
def test_empty_data_files(lorakit, files, tmp_path, content, key, message):
    path = tmp_path / "data.jsonl"
    path.write_text(content)
    done = lorakit("--out", tmp_path / "run", *settings(files, **{key: path}))
    assert_error(done, message.format(path=path))
    assert not (tmp_path / "run").exists()


def test_one_record_leaves_nothing_to_train_on(lorakit, files, tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", reverse_rows(1))
    done = lorakit("--out", tmp_path / "run", *settings(files, **{"data.train": path, "data.validation": None}))
    assert_error(done, f"data.train={path}: its 1 record(s) all go to validation (data.validation_fraction=0.05 "
                       "holds out at least one), none is left to train on")


def test_data_that_is_not_utf8_names_the_line(lorakit, files, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    done = lorakit("--out", tmp_path / "run", *settings(files, **{"data.train": path}))
    assert_error(done, f"data.train: {path}:2: not UTF-8 text (byte 0xe9 at offset 50)")


def test_all_prompt_data_is_an_error_with_counts(lorakit, files, tmp_path):
    done = lorakit("--out", tmp_path / "run", *settings(files, **{"data.max_length": 5}))
    assert_error(done, "data.train: none of its 32 examples has a token left to learn (0 supervised tokens; "
                       "32 cut at data.max_length=5)",
                 "validation: none of its 8 examples has a token to score")
    assert not (tmp_path / "run").exists()


def test_too_few_examples_for_a_batch_fails_before_anything_is_written(lorakit, files, tmp_path):
    changes = {"data.train": write_jsonl(tmp_path / "small.jsonl", reverse_rows(5)), "train.batch_size": 8}
    done = lorakit("--out", tmp_path / "run", *settings(files, **changes))
    assert_error(done, "5 training examples is fewer than one batch of 8 (train.batch_size=8): lower "
                       "train.batch_size or add data")
    assert "model:" not in done.stdout and "evaluating" not in done.stdout
    assert not (tmp_path / "run").exists()  # so the same --out works once the data is fixed


# --- configuration -------------------------------------------------------------------------------------

def test_a_huge_rank_is_refused_before_loading(lorakit, files, tmp_path):
    done = lorakit("--out", tmp_path / "run", *settings(files, **{"lora.r": 100_000_000}))
    assert_error(done, "lora.r=100000000: the adapters alone would need",
                 "a layer here can use a rank of at most 64")
    assert "model:" not in done.stdout and not (tmp_path / "run").exists()


def test_a_rank_above_the_layers_warns(lorakit, files, tmp_path):
    done = lorakit("--out", tmp_path / "run", *settings(files, **{"lora.r": 1000, "train.steps": 1}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "%|" not in done.stderr, done.stderr  # --no-progress: no bar, transformers' loading bar neither
    assert "\nstep 1/1: loss " in done.stdout  # the step as a line instead
    assert ("warning: lora.r=1000 is more than 14 of the 14 adapted layers can use: a weight (out, in) has "
            "rank at most min(in, out) (e.g. model.layers.0.self_attn.q_proj: 64 -> 64, at most 64)") in done.stdout


# nine levels of nine aliases each: 9^9 values once expanded, a few hundred bytes of YAML
BOMB = ["&a0 [" + ", ".join(["x"] * 9) + "]"] + [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]


def test_yaml_alias_bomb_is_refused(lorakit, files, tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text("lora:\n  targets: [" + ", ".join(BOMB) + "]\n")
    done = lorakit(config, "--out", tmp_path / "run", *settings(files))
    assert_error(done, f"{config}: its aliases expand to more than 100,000 values")
    done = lorakit("--out", tmp_path / "run", *settings(files), "--set", "lora.targets=[" + ", ".join(BOMB) + "]")
    assert_error(done, "cannot parse the value (its aliases expand to more than 100,000 values")


def test_duplicate_yaml_keys_are_refused(lorakit, files, tmp_path):
    config = tmp_path / "dup.yaml"
    config.write_text("train:\n  lr: 0.001\n  steps: 4\n  lr: 0.1\n")
    done = lorakit(config, "--out", tmp_path / "run", *settings(files))
    assert_error(done, f"{config}: line 4: duplicate key 'lr' (first given at line 2); give each key once")


def test_float16_on_the_cpu_warns(lorakit, files, tmp_path):
    done = lorakit("--out", tmp_path / "run", *settings(files, **{"model.dtype": "float16", "train.steps": 1}))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: model.dtype=float16 on the CPU is very slow" in done.stdout
    assert "use model.dtype=bfloat16 or float32" in done.stdout


def test_nan_in_the_base_is_not_blamed_on_the_learning_rate(lorakit, files, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(files / "model", model)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"][3, 3] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    done = lorakit("--out", tmp_path / "run", *settings(files, **{"model.path": model}))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert ("the loss is nan at step 1, before any update, so the learning rate plays no part: the base "
            "model's weights or the data are broken") in done.stdout
    assert "e.g. model.layers.0.mlp.up_proj.base_layer.weight" in done.stdout
    assert "too high" not in done.stdout
    assert "no adapter to keep, so none is written" in done.stdout
    assert not (tmp_path / "run" / "adapter").exists()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["result"] is None
    assert torch.isnan(load_file(model / "model.safetensors")["model.layers.0.mlp.up_proj.weight"][3, 3])
