"""Stress the teardown of 2-process gloo runs: a tiny DDP and a tiny FSDP run (torchrun, 2 CPU
processes, the tiny Llama of tests/test_distributed.py), each launched N times while a CPU-bound
job competes for the cores, each launch with a timeout; counts the launches that hang.

    python bench/teardown_stress.py [--runs 50] [--repeat 10] [--timeout 240] [--strategies ddp,fsdp] [--busy 1]
                                    [--mode train|end] [--switch-interval S]

--mode end runs only the end of train() (see worker): the race of issue 11 without the frees in
train() that close its window by chance; with the pre-fix teardown, DDP launches hang there.
--switch-interval S sets sys.setswitchinterval(S) in the workers: the main thread keeps the GIL
up to S seconds while gloo's worker thread waits for it (it still hands it over whenever it
blocks, e.g. on any collective or file I/O, which train() does after its teardown); measured:
--mode train --switch-interval 5 did not hang the pre-fix code in 5 runs.

Each torchrun launch trains `repeat` times in the same two processes (each run joins the process
group and tears it down), so 50 runs cost 5 launches. A hang is a launch still running at its timeout (issue 11: a rank stuck in ~ProcessGroupGloo
while a gloo worker thread waits for the GIL). Every launch starts in its own session and is killed
with all its processes on timeout (tests/test_distributed.py's kill_tree), as is the competing job
at the end: nothing is left behind. Prints one line per launch, then the counts; the last line is a JSON object.

A worker (run by torchrun): python bench/teardown_stress.py --worker ddp|fsdp OUT_DIR REPEAT SWITCH MODE
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(strategy: str, out: str, repeat: int, switch_interval: float, mode: str) -> None:
    """`repeat` short runs under torchrun, one after the other in the same processes (each joins
    and leaves the process group: one teardown each), ended as `lorakit train` ends (exit_process).

    mode "train": train() itself (2 steps, one checkpoint and one evaluation in between: every
    kind of collective train() uses). mode "end": only what train() does at its end, with nothing
    in between: the wrapped model takes one step, all_gather_objects then teardown, and the wrapper
    is dropped (as train() returning drops it). The race of issue 11: gloo's worker thread frees the
    finished barrier, and with it all_gather_object's Python-made tensors (it needs the GIL), while
    the main thread, holding the GIL, frees the last C++ owner of the group (DDP's Reducer), whose
    destructor joins that thread. train() frees many other things first (files, the optimizer,
    a large DDP wrapper's attributes, ...), and any of them that lets the GIL go lets the worker
    thread finish in time, so its hang depends on chance; "end" takes those chances away.
    switch_interval > 0: sys.setswitchinterval(switch_interval) for the runs."""
    sys.path.insert(0, str(ROOT / "tests"))
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from test_training_loop import tiny_run

    from lorakit import distributed
    from lorakit.training import train

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if switch_interval > 0:
        sys.setswitchinterval(switch_interval)
    for i in range(repeat):
        # a fresh key prefix per run: the gloo rendezvous of a new process group must not read
        # the addresses of the one torn down before (train() then finds the group initialised)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"run{i}", store), rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        if mode == "end":
            end_of_train(strategy, i)
            continue
        config, prepared = tiny_run(["lora.dropout=0.0", "train.batch_size=4", "train.steps=2", "train.save_every=1",
                                     "eval.every=1", "eval.max_new_tokens=2", f"train.strategy={strategy}"],
                                    n_train=16)
        # rank 0 writes the run; the others get a directory of their own, which they never write:
        # train() checks the run directory's lock on every rank, so a rank arriving after rank 0
        # took the lock would refuse the shared one
        train(config, f"{out}/{i}" + ("" if rank == 0 else f".rank{rank}"), prepared=prepared, progress=False,
              log=lambda *_: None)
    distributed.exit_process(0)


def end_of_train(strategy: str, i: int) -> None:
    """The end of train() alone: the wrapped model takes one step, then all_gather_objects and
    teardown, and the wrapper is freed when this returns, as train()'s is."""
    import torch
    from test_training_loop import tiny_run

    from lorakit import distributed
    from lorakit.loss import SummedLoss

    ctx = distributed.setup("cpu")
    if strategy == "ddp":  # one layer: nothing freed ahead of its Reducer lets the GIL go
        model = distributed.wrap(torch.nn.Linear(4, 4), ctx, strategy)
        model(torch.ones(2, 4)).sum().backward()
    else:  # FSDP shards decoder layers: the tiny Llama
        _, prepared = tiny_run(["lora.dropout=0.0"], n_train=16)
        model = distributed.wrap(SummedLoss(prepared.model), ctx, strategy)
        ids = torch.randint(0, 32, (2, 8))
        model(ids, torch.ones_like(ids), ids).backward()
    distributed.all_gather_objects({"run": i}, ctx)
    distributed.teardown(ctx)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process below it (torchrun's workers run in sessions of their own,
    so its process group alone is not enough), then reap it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_distributed import kill_tree

    if proc.poll() is None:
        kill_tree(proc.pid)
    proc.wait()


def launch(strategy: str, out: Path, repeat: int, timeout: float, switch_interval: float,
           mode: str) -> tuple[str, float]:
    """One torchrun launch of 2 workers, `repeat` runs each: ("ok" | "hang" | "failed", seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--worker", strategy, str(out), str(repeat), str(switch_interval), mode]
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            return "hang", time.perf_counter() - start
        finally:
            kill_group(proc)  # torchrun's workers too, whatever happened
    ok = code == 0 and (mode == "end" or all((out / str(i) / "summary.json").is_file() for i in range(repeat)))
    return ("ok" if ok else "failed"), time.perf_counter() - start


def busy_job(n: int) -> list[subprocess.Popen]:
    """n CPU-bound processes (a Python loop each), each in its own session."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=5, metavar=("STRATEGY", "OUT", "REPEAT", "SWITCH", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=50, help="training runs (teardowns) per strategy")
    parser.add_argument("--repeat", type=int, default=10,
                        help="runs per torchrun launch (start-up costs ~25 s of 2 busy cores)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds before a launch counts as hung")
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--busy", type=int, default=1, help="competing CPU-bound processes")
    parser.add_argument("--switch-interval", type=float, default=0,
                        help="sys.setswitchinterval in the workers, seconds (0: Python's 0.005)")
    parser.add_argument("--mode", choices=("train", "end"), default="train",
                        help="train: train() itself; end: only the end of train() (see worker)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]), float(args.worker[3]), args.worker[4])
        return 0

    strategies = args.strategies.split(",")
    launches = -(-args.runs // args.repeat)
    counts = {s: {"ok": 0, "hang": 0, "failed": 0} for s in strategies}  # per launch
    logs = Path(tempfile.mkdtemp(prefix="lorakit-teardown-"))
    competing = busy_job(args.busy)
    start = time.perf_counter()
    try:
        for i in range(launches):
            for s in strategies:
                outcome, seconds = launch(s, logs / f"{s}-{i}", args.repeat, args.timeout, args.switch_interval,
                                          args.mode)
                counts[s][outcome] += 1
                print(f"{s} launch {i + 1}/{launches} ({args.repeat} runs): {outcome} ({seconds:.1f} s)"
                      + (f"  log: {logs / f'{s}-{i}.log'}" if outcome != "ok" else ""), flush=True)
    finally:
        for proc in competing:
            kill_group(proc)
    elapsed = time.perf_counter() - start
    for s in strategies:
        print(f"{s}: {counts[s]['hang']} hung and {counts[s]['failed']} failed launches of {launches} "
              f"({launches * args.repeat} runs)")
    print(f"elapsed {elapsed:.0f} s, timeout {args.timeout:.0f} s per launch, {args.busy} competing job(s); "
          f"logs in {logs}")
    print(json.dumps({"runs_per_strategy": launches * args.repeat, "repeat": args.repeat, "timeout_s": args.timeout,
                      "busy": args.busy, "elapsed_s": round(elapsed, 1), **counts}))
    return 0 if all(c["hang"] == 0 and c["failed"] == 0 for c in counts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
