"""Memory of FSDP start-up per rank: loading the base part by part while sharding it (what
`lorakit train` does under `train.strategy: fsdp`) vs loading it whole on every rank first.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 bench/fsdp_startup.py

Each rank loads SmolLM2-135M-Instruct both ways, one after the other in a fresh process each
(so each peak RSS is its own), adds LoRA (r=16, all linear layers), wraps in FSDP2 over the ranks,
and prints its peak resident memory (ru_maxrss, which includes the interpreter and libraries: the
same for both), the bytes of whole frozen parameters it ever held at a shard call, and the bytes
of its own shards. Rank 0 prints the table.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch


def one(lazy: bool, method: str) -> dict:
    import torch.distributed.fsdp as fsdp
    from torch.distributed.tensor import DTensor

    from lorakit import distributed
    from lorakit.config import RunConfig
    from lorakit.loss import SummedLoss
    from lorakit.training.setup import load_base, prepare_model

    config = RunConfig.from_dict({}, [f"method={method}", "lora.r=16", "lora.targets=all-linear",
                                      "train.strategy=fsdp"]).validate()
    ctx = distributed.setup("cpu")
    model, _, fill = load_base(config, lazy=lazy)
    prepare_model(model, config)
    whole, shard = [], fsdp.fully_shard

    def counting(module, *args, **kwargs):
        whole.append(sum(p.numel() * p.element_size() for p in model.parameters()
                         if not p.requires_grad and not p.is_meta and not isinstance(p, DTensor)))
        return shard(module, *args, **kwargs)

    fsdp.fully_shard = counting
    distributed.wrap(SummedLoss(model), ctx, "fsdp", fill)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()
                for p in model.parameters() if not p.requires_grad)
    result = {"rank": ctx.rank, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "max_whole": max(whole), "local_frozen": local}
    distributed.teardown(ctx)
    return result


def main() -> int:
    if len(sys.argv) > 1:  # a worker: python fsdp_startup.py lazy|eager METHOD (under torchrun)
        from lorakit.distributed import exit_process

        print("RESULT " + json.dumps(one(sys.argv[1] == "lazy", sys.argv[2])), flush=True)
        exit_process(0)  # as `lorakit train` does under torchrun
        return 0
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    rows = []
    for method in ("lora", "qlora"):
        for mode in ("eager", "lazy"):
            out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  "2", __file__, mode, method], capture_output=True, text=True, check=True,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"})
            results = [json.loads(line[7:]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            for r in sorted(results, key=lambda r: r["rank"]):
                rows.append((method, "whole, then shard" if mode == "eager" else "part by part", r))
    print("| method | start-up | rank | peak RSS | largest whole base held | own shards |")
    print("|---|---|---|---|---|---|")
    for method, mode, r in rows:
        print(f"| {method} | {mode} | {r['rank']} | {r['peak_rss'] / 2**20:,.0f} MiB | "
              f"{r['max_whole'] / 2**20:,.1f} MiB | {r['local_frozen'] / 2**20:,.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
