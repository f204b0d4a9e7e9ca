"""Data-parallel training with torchrun on CPU (gloo): 2 processes equal 1 process with the same
global batch, with DDP (replicated model) and FSDP (sharded model, also on an NF4 base)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit import monitor

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from conftest import tiny_llama
    from test_training_loop import tiny_run
    from lorakit.nf4 import quantize_linears
    from lorakit.training import SFT, Hooks, train
    from lorakit.training.setup import prepare_model
    import torch.distributed.fsdp as fsdp
    from torch.distributed.tensor import DTensor
    out, resume, base, *overrides = sys.argv[1:]
    config, prepared = tiny_run(["lora.dropout=0.0", *overrides])
    if base == "nf4":  # QLoRA: the same tiny model with NF4 linear layers (head kept), then LoRA
        model = quantize_linears(tiny_llama(vocab=len(prepared.tokenizer), init_range=0.1), skip={{"lm_head"}})
        prepared.model = prepare_model(model, config)
    if base == "moe":  # QLoRA on a tiny Mixtral: NF4 linear layers (head kept) and NF4 expert weights
        from transformers import MixtralConfig, MixtralForCausalLM
        from lorakit.nf4 import quantize_parameter_
        from lorakit.surgery import expert_parameters
        torch.manual_seed(0)
        moe = MixtralForCausalLM(MixtralConfig(
            vocab_size=len(prepared.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4,
            num_experts_per_tok=2, initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2))
        model = quantize_linears(moe, skip={{"lm_head"}})
        for owner, leaf in expert_parameters(model):
            quantize_parameter_(model.get_submodule(owner), leaf)
        prepared.model = prepare_model(model, config)
    if base == "path":  # train() loads model.path and data.* itself
        prepared = None
    if base == "pairs":  # DPO on test_dpo's preference pairs (reversed word vs one wrong letter)
        from test_dpo import tiny_preference_run
        config, prepared = tiny_preference_run(["lora.dropout=0.0", *overrides])
    # bytes of whole (unsharded) frozen parameters each time FSDP shards a part (replicated
    # buffers apart: rotary frequencies, NF4 code tables)
    models_seen, whole_at_shard = [], []
    shard = fsdp.fully_shard
    def whole(module):
        return sum(p.numel() * p.element_size() for p in module.parameters()
                   if not p.requires_grad and not p.is_meta and not isinstance(p, DTensor))
    def counting_shard(module, *args, **kwargs):  # (in the whole model, in the part being sharded)
        whole_at_shard.append((whole(models_seen[0]), whole(module)))
        return shard(module, *args, **kwargs)
    fsdp.fully_shard = counting_shard
    objective = SFT()
    if base == "pairs":
        from lorakit.training.objectives import objective_for
        objective = objective_for(config)
    if os.environ.get("DIE_AT"):  # "RANK:STEP": that rank fails while it builds that step's batches
        die_rank, die_step = map(int, os.environ["DIE_AT"].split(":"))
        class Dying(SFT):
            def micro_batches(self, dataset, step, config, ctx, pad_id):
                if ctx.rank == die_rank and step == die_step:
                    raise RuntimeError(f"rank {{die_rank}} fails on purpose")
                return super().micro_batches(dataset, step, config, ctx, pad_id)
        objective = Dying()
    train(config, out, resume=resume == "resume", prepared=prepared, progress=False, log=lambda *_: None,
          objective=objective, hooks=Hooks(model_ready=models_seen.append))
    model = models_seen[0]
    # bytes of this rank's parameters (local shards under FSDP), frozen NF4 codes/scales apart
    sizes = {{"nf4": [0, 0], "frozen": [0, 0], "trainable": [0, 0]}}
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        kind = "trainable" if p.requires_grad else "nf4" if p.dtype == torch.uint8 or "weight_" in name else "frozen"
        sizes[kind][0] += local.numel() * local.element_size()
        sizes[kind][1] += p.numel() * p.element_size()
    rank = os.environ.get("RANK", "0")
    with open(out + f".rank{{rank}}.json", "w") as f:
        json.dump({{**{{k: {{"local": v[0], "full": v[1]}} for k, v in sizes.items()}},
                   "whole_at_shard": whole_at_shard}}, f)
    from lorakit.distributed import exit_process
    exit_process(0)  # as `lorakit train` does under torchrun
""")


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (children, grandchildren, ...), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it. torchrun starts each worker in a session of its
    own, so killing the launch's process group alone would leave the workers running, parented
    to init. The root is stopped first so that it cannot start new ones meanwhile."""
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return
    while family := descendants(pid):
        for p in family:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    os.killpg(pid, signal.SIGKILL)  # the launch's own session: the root and anything left in it


def run_launch(cmd, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) in a new session; on timeout, the
    whole launch (torchrun and its workers) is killed before TimeoutExpired is raised."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run(tmp_path, out, nproc, overrides=(), resume=False, nf4=False, base=None, check=True, forkserver=None):
    """Train the tiny run with `nproc` processes: torchrun when > 1, else one process forked by
    `forkserver` (tests/processes.py). base: "path" lets train() load model.path and the data files
    itself; default: a model built in memory (NF4 if nf4)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / out), "resume" if resume else "fresh", base or ("nf4" if nf4 else "float"), *overrides]
    if nproc == 1:
        done = forkserver.run(*args, script=script, env=env, timeout=300)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(script), *args]
        done = run_launch(cmd, env=env, timeout=300)
    if not check:
        return done
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / out


def on_disk(tmp_path) -> list[str]:
    """The tiny model, tokenizer and reverse-task data written out, as `lorakit train` reads them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import char_tokenizer, tiny_llama
    from test_training_loop import reverse_task

    tok = char_tokenizer()
    tiny_llama(vocab=len(tok), init_range=0.1).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    for name, n, seed in (("train", 64, 0), ("val", 16, 1), ("test", 8, 2)):
        rows = [json.dumps(r.fields) for r in reverse_task(n, seed)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    # 4-letter words over 6 letters repeat across splits (2 of the 16 validation prompts are training
    # prompts): leakage the data check would stop a run for, which these tests are not about
    return [f"model.path={tmp_path / 'model'}", f"data.train={tmp_path / 'train.jsonl'}",
            f"data.validation={tmp_path / 'val.jsonl'}", f"data.test={tmp_path / 'test.jsonl'}",
            "data.max_leakage=1"]


def curve(run_dir):
    return [(r["step"], r["loss"]) for r in monitor.MetricsLog(run_dir / "metrics.jsonl").read()
            if r["type"] == "train"]


def adapter(run_dir):
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


# Runs that split the global batch differently (one process of 8 rows, two of 4) multiply matrices
# of other shapes, which the CPU BLAS sums in another order (below ~12 rows it switches kernels), and
# AdamW turns such rounding in a near-zero gradient into a visible step (lr 0.02 here). Measured: one
# process of 8 rows against itself after a change of the loss's product layout alone, 2.1e-5 in
# the adapters after 12 steps; one against two processes, 4e-6 before that change and 2.5e-5 after.
# A distribution bug (a gradient not averaged, a shard lost) moves weights by ~lr: 200x this bound.
ACROSS_SHAPES_ATOL = 1e-4


def assert_same_run(a, b, adapter_atol=1e-5):
    """Equal loss curves (1e-5) and adapters (rtol 1e-4, atol `adapter_atol`; ACROSS_SHAPES_ATOL
    where the two runs split the batch into other shapes)."""
    ca, cb = curve(a), curve(b)
    assert [s for s, _ in ca] == [s for s, _ in cb] and len(ca) == 12
    for (_, la), (_, lb) in zip(ca, cb):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=adapter_atol)


@pytest.fixture(scope="module")
def batch_of_8(forkserver, tmp_path_factory):
    """The global batch of 8 rows (2 micro-batches) in one process, and in two with DDP (4 rows
    each): the runs that several tests compare with, trained once for the module."""
    root = tmp_path_factory.mktemp("batch_of_8")
    return (run(root, "single", 1, ["train.batch_size=8", "train.grad_accum=2"], forkserver=forkserver),
            run(root, "ddp", 2, ["train.batch_size=4", "train.grad_accum=2"]))


def test_two_processes_equal_one_with_the_same_global_batch(batch_of_8):
    single, ddp = batch_of_8
    assert_same_run(single, ddp, ACROSS_SHAPES_ATOL)
    summary = json.loads((ddp / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["tokens_seen"] == json.loads((single / "summary.json").read_text())["tokens_seen"]
    # only rank 0 wrote: one line per step, no duplicates
    assert len([r for r in monitor.MetricsLog(ddp / "metrics.jsonl").read() if r["type"] == "train"]) == 12


def test_dpo_two_processes_equal_one_with_ddp_and_fsdp(forkserver, tmp_path):
    # B pairs split over 2 ranks: each rank's reference forward (adapters disabled) and policy forward
    # see its own pairs; the loss per pair is summed over ranks and divided by the global pair count
    single = run(tmp_path, "single", 1, ["train.batch_size=8", "train.grad_accum=2"], base="pairs",
                 forkserver=forkserver)
    ddp = run(tmp_path, "ddp", 2, ["train.batch_size=4", "train.grad_accum=2"], base="pairs")
    assert_same_run(single, ddp, ACROSS_SHAPES_ATOL)
    assert curve(single)[0][1] == pytest.approx(0.6931471805599453, abs=1e-6)  # ln 2: the policy is the reference
    rewards = [[(r["step"], r["rewards/margins"], r["rewards/accuracies"]) for r in monitor.MetricsLog(
        d / "metrics.jsonl").read() if r["type"] == "train"] for d in (single, ddp)]
    for (sa, ma, aa), (sb, mb, ab) in zip(*rewards):
        assert (sa, aa) == (sb, ab) and ma == pytest.approx(mb, rel=1e-4, abs=1e-6)
    assert json.loads((ddp / "summary.json").read_text())["world_size"] == 2
    # FSDP: the sharded model's first forward is the objective's probe (one pair), then the same run
    fsdp = run(tmp_path, "fsdp", 2, ["train.batch_size=4", "train.grad_accum=2", "train.strategy=fsdp"], base="pairs")
    assert_same_run(single, fsdp, ACROSS_SHAPES_ATOL)


def test_resume_with_two_processes(tmp_path):
    # a constant schedule: the learning rate of a step does not depend on train.steps
    full = run(tmp_path, "full", 2, ["train.batch_size=4", "train.schedule=constant"])
    cut = run(tmp_path, "cut", 2, ["train.batch_size=4", "train.schedule=constant", "train.steps=6"])
    import shutil

    shutil.rmtree(cut / "adapter")
    (cut / "summary.json").unlink()
    run(tmp_path, "cut", 2, ["train.batch_size=4", "train.schedule=constant"], resume=True)
    assert_same_run(full, cut)


def shard_sizes(run_dir, rank):
    """The parameter bytes that rank held in the run written to run_dir (the script's rank file)."""
    return json.loads(run_dir.with_name(f"{run_dir.name}.rank{rank}.json").read_text())


def test_fsdp_equals_ddp_and_one_process(tmp_path, batch_of_8):
    single, ddp = batch_of_8
    fsdp = run(tmp_path, "fsdp", 2, ["train.batch_size=4", "train.grad_accum=2", "train.strategy=fsdp"])
    assert_same_run(single, fsdp, ACROSS_SHAPES_ATOL)
    assert_same_run(ddp, fsdp)
    evals = [[(r["step"], r.get("val_loss")) for r in monitor.MetricsLog(d / "metrics.jsonl").read()
              if r["type"] == "eval"] for d in (single, fsdp)]
    assert [s for s, _ in evals[0]] == [s for s, _ in evals[1]] == [0, 4, 8, 12]
    for (_, a), (_, b) in zip(*evals):  # evaluated through the sharded model on both ranks
        assert a == pytest.approx(b, rel=1e-5)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (single, fsdp)]
    assert summaries[1]["world_size"] == 2
    assert [s["after"]["exact_match"] for s in summaries] == [summaries[0]["after"]["exact_match"]] * 2
    # each rank holds half of every parameter (dim-0 shards), single process all of it
    for rank in (0, 1):
        sizes = shard_sizes(fsdp, rank)
        for kind in ("frozen", "trainable"):
            assert sizes[kind]["local"] == pytest.approx(sizes[kind]["full"] / 2, rel=0.05), (rank, kind)
    single_sizes = shard_sizes(single, 0)
    assert all(single_sizes[k]["local"] == single_sizes[k]["full"] for k in ("nf4", "frozen", "trainable"))


def test_fsdp_resume_with_two_processes(tmp_path):
    fsdp = ["train.batch_size=4", "train.schedule=constant", "train.strategy=fsdp"]
    full = run(tmp_path, "full", 2, fsdp)
    cut = run(tmp_path, "cut", 2, [*fsdp, "train.steps=6"])
    import shutil

    shutil.rmtree(cut / "adapter")
    (cut / "summary.json").unlink()
    run(tmp_path, "cut", 2, fsdp, resume=True)
    assert_same_run(full, cut)
    # the checkpoint holds full tensors, as a single process writes them
    ckpt = load_file(cut / "checkpoints" / "step-4" / "trainable.safetensors")
    assert ckpt.keys() == {k.replace("base_model.model.", "").replace(".weight", ".default.weight")
                           for k in adapter(cut)}
    assert ckpt["model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape == (4, 32)


def test_qlora_with_fsdp_equals_one_process_and_shards_the_nf4_base(forkserver, tmp_path):
    qlora = ["train.grad_accum=2"]  # the NF4 base is built in the script (base "nf4"), so method stays lora
    single = run(tmp_path, "single", 1, [*qlora, "train.batch_size=8"], nf4=True, forkserver=forkserver)
    fsdp = run(tmp_path, "fsdp", 2, [*qlora, "train.batch_size=4", "train.strategy=fsdp"], nf4=True)
    assert_same_run(single, fsdp, ACROSS_SHAPES_ATOL)
    # single process: the 4-bit state stays in buffers (not parameters); FSDP: sharded parameters
    assert shard_sizes(single, 0)["nf4"] == {"local": 0, "full": 0}
    ranks = [shard_sizes(fsdp, r) for r in (0, 1)]
    nf4_full = ranks[0]["nf4"]["full"]
    # 14 NF4Linear layers, 2 x 32 x 32 + ... weights: 0.5 byte + DQ absmax 1/64 byte per weight, + nested scales
    assert nf4_full > 0
    for sizes in ranks:
        assert sizes["nf4"]["local"] == pytest.approx(nf4_full / 2, rel=0.05)
    assert sum(s["nf4"]["local"] for s in ranks) == nf4_full


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp_start_up_never_holds_the_whole_base_and_equals_one_process(forkserver, tmp_path, method):
    files = [*on_disk(tmp_path), f"method={method}", "train.grad_accum=2"]
    single = run(tmp_path, "single", 1, [*files, "train.batch_size=8"], base="path", forkserver=forkserver)
    fsdp = run(tmp_path, "fsdp", 2, [*files, "train.batch_size=4", "train.strategy=fsdp"], base="path")
    assert_same_run(single, fsdp, ACROSS_SHAPES_ATOL)
    for rank in (0, 1):
        sizes = shard_sizes(fsdp, rank)
        base = sizes["frozen"]["full"] + sizes["nf4"]["full"]
        # one entry per fully_shard call (2 decoder layers, then the root): the only whole tensors
        # in the model are those of the part being sharded, never the whole base
        whole = sizes["whole_at_shard"]
        assert len(whole) == 3 and all(in_model == in_part > 0 for in_model, in_part in whole), whole
        assert max(in_model for in_model, _ in whole) < 0.8 * base, (rank, whole, base)
        assert sizes["frozen"]["local"] + sizes["nf4"]["local"] == pytest.approx(base / 2, rel=0.05)
    if method == "lora":  # a model built in memory before train() is whole when sharding starts
        built = run(tmp_path, "built", 2, ["train.batch_size=4", "train.strategy=fsdp", "train.steps=1"])
        sizes = shard_sizes(built, 0)
        assert sizes["whole_at_shard"][0][0] == sizes["frozen"]["full"]


def test_fsdp_with_gradient_checkpointing_equals_one_process(tmp_path, batch_of_8):
    # against the one-process run without checkpointing: recomputing the blocks must not move the
    # curve or the adapter beyond what the batch's other split does
    single, _ = batch_of_8
    fsdp = run(tmp_path, "fsdp", 2, ["train.grad_accum=2", "train.gradient_checkpointing=true", "train.batch_size=4",
                                     "train.strategy=fsdp"])
    assert_same_run(single, fsdp, ACROSS_SHAPES_ATOL)


def test_a_rank_that_dies_fails_the_run_instead_of_hanging(tmp_path):
    # rank 1 raises in step 7 (after the step-4 checkpoint); rank 0 is then waiting in a collective
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "DIE_AT": "1:7"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path / "dead"), "fresh", "float", "train.batch_size=4"]
    start = time.perf_counter()
    done = run_launch(cmd, env=env, timeout=240)
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr
    assert time.perf_counter() - start < 120  # torchrun stopped rank 0; no collective timeout needed
    dead = tmp_path / "dead"
    assert not (dead / "summary.json").exists() and not (dead / "adapter").exists()
    assert (dead / "checkpoints" / "step-4" / "trainable.safetensors").is_file()  # work so far is kept
    assert [s for s, _ in curve(dead)] == [1, 2, 3, 4, 5, 6]


def test_a_timed_out_launch_leaves_no_process_behind(tmp_path):
    # a launch like torchrun's: the launcher starts a worker in a session of its own, which starts
    # a child; all sleep forever and write their pids. On the timeout every one of them is killed.
    script, pids = tmp_path / "tree.py", tmp_path / "pids"
    script.write_text(textwrap.dedent(f"""
        import os, subprocess, sys, time
        def note():
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{os.getpid()}} {{os.getsid(0)}}\\n")
        note()
        if len(sys.argv) < 3:
            subprocess.Popen([sys.executable, __file__, "worker", *sys.argv[1:2]], start_new_session=sys.argv[1:] == [])
        time.sleep(10**6)
    """))
    with pytest.raises(subprocess.TimeoutExpired):  # three bare interpreters start in well under 1 s
        run_launch([sys.executable, str(script)], timeout=10)
    rows = [tuple(map(int, line.split())) for line in pids.read_text().splitlines()]
    assert len(rows) == 3  # launcher, worker, worker's child
    assert rows[1][1] != rows[0][1]  # the worker ran in a session of its own
    assert [pid for pid, _ in rows if alive(pid)] == []


def test_qlora_moe_with_fsdp_equals_one_process_and_shards_the_nf4_experts(forkserver, tmp_path):
    # the NF4 Mixtral is built in the script (base "moe"), so method stays lora
    single = run(tmp_path, "single", 1, ["train.grad_accum=2", "train.batch_size=8"], base="moe", forkserver=forkserver)
    fsdp = run(tmp_path, "fsdp", 2, ["train.grad_accum=2", "train.batch_size=4", "train.strategy=fsdp"], base="moe")
    assert_same_run(single, fsdp, ACROSS_SHAPES_ATOL)
    assert shard_sizes(single, 0)["nf4"] == {"local": 0, "full": 0}  # buffers in one process
    # 4-bit state as FSDP parameters: 49,152 expert + 6,144 linear weights at 0.5 byte, a uint8 absmax
    # code per 64 weights (864) and a float32 DQ scale per weight (4 experts + 8 linears): the experts'
    # packed codes (24,576 bytes) are sharded too, not kept whole on every rank
    ranks = [shard_sizes(fsdp, r) for r in (0, 1)]
    assert ranks[0]["nf4"]["full"] == (49_152 + 6_144) // 2 + 864 + 12 * 4 == 28_560
    for sizes in ranks:
        assert sizes["nf4"]["local"] == pytest.approx(28_560 / 2, rel=0.05)
    assert sum(s["nf4"]["local"] for s in ranks) == 28_560
