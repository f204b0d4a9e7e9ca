"""Stress the teardown of 2-process gloo runs: a tiny DDP and a tiny FSDP run (torchrun, 2 CPU
processes, the tiny Llama of tests/test_distributed.py), each launched N times while a CPU-bound
job competes for the cores, each launch with a timeout; counts the launches that hang.

    python bench/teardown_stress.py [--runs 50] [--repeat 10] [--timeout 240] [--strategies ddp,fsdp] [--busy 1]

Each torchrun launch trains `repeat` times in the same two processes (each run joins the process
group and tears it down), so 50 runs cost 5 launches. A hang is a launch still running at its timeout (issue 11: a rank stuck in ~ProcessGroupGloo
while a gloo worker thread waits for the GIL). Every launch starts in its own session and is killed
with all its processes on timeout (tests/test_distributed.py's kill_tree), as is the competing job
at the end: nothing is left behind. Prints one line per launch, then the counts; the last line is a JSON object.

A worker (run by torchrun): python bench/teardown_stress.py --worker ddp|fsdp OUT_DIR REPEAT
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


def worker(strategy: str, out: str, repeat: int) -> None:
    """`repeat` short training runs under torchrun, one after the other in the same processes
    (each joins and leaves the process group: one teardown each), ended as `lorakit train` ends
    (exit_process)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from test_train import tiny_run

    from lorakit.distributed import exit_process
    from lorakit.train import train

    # 2 steps, one checkpoint and one evaluation in between: every kind of collective train() uses
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    for i in range(repeat):
        # a fresh key prefix per run: the gloo rendezvous of a new process group must not read
        # the addresses of the one torn down before (train() then finds the group initialised)
        dist.init_process_group("gloo", store=dist.PrefixStore(f"run{i}", store), rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        config, prepared = tiny_run(["lora.dropout=0.0", "train.batch_size=4", "train.steps=2", "train.save_every=1",
                                     "eval.every=1", "eval.max_new_tokens=2", f"train.strategy={strategy}"],
                                    n_train=16)
        train(config, f"{out}/{i}", prepared=prepared, progress=False, log=lambda *_: None)
    exit_process(0)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and every process below it (torchrun's workers run in sessions of their own,
    so its process group alone is not enough), then reap it."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_distributed import kill_tree

    if proc.poll() is None:
        kill_tree(proc.pid)
    proc.wait()


def launch(strategy: str, out: Path, repeat: int, timeout: float) -> tuple[str, float]:
    """One torchrun launch of 2 workers, `repeat` runs each: ("ok" | "hang" | "failed", seconds)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--worker", strategy, str(out), str(repeat)]
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
    ok = code == 0 and all((out / str(i) / "summary.json").is_file() for i in range(repeat))
    return ("ok" if ok else "failed"), time.perf_counter() - start


def busy_job(n: int) -> list[subprocess.Popen]:
    """n CPU-bound processes (a Python loop each), each in its own session."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("STRATEGY", "OUT", "REPEAT"), help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=50, help="training runs (teardowns) per strategy")
    parser.add_argument("--repeat", type=int, default=10,
                        help="runs per torchrun launch (start-up costs ~25 s of 2 busy cores)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds before a launch counts as hung")
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--busy", type=int, default=1, help="competing CPU-bound processes")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
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
                outcome, seconds = launch(s, logs / f"{s}-{i}", args.repeat, args.timeout)
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
