"""`lorakit plan`: predict peak training memory and recommend full fine-tuning, LoRA or QLoRA.

A thin layer over lorakit.planner: every option maps to a PlanConfig field.
"""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.planner import DTYPES, METHODS, OPTIMIZERS, plan, render_plan


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `plan` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="predict peak memory and recommend full / LoRA / QLoRA",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="preset (e.g. llama-3.1-8b), local model directory or config.json, or a hub id")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=None,
                   help="module names (default: q_proj v_proj), 'all-linear', or one regex")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs sharding the model with FSDP (train.strategy: fsdp); plan DDP runs with 1")
    p.add_argument("--gpu-gb", type=float, default=None,
                   help="memory per GPU in GiB for the recommendation (default 24)")
    p.add_argument("--domain-shift", action="store_true",
                   help="the data is far from pretraining: consider full fine-tuning")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run)
    return p


def _targets(values):
    if values is None:
        return None
    if len(values) == 1 and (values[0] == "all-linear" or any(ch in values[0] for ch in "*.[]()|\\^$+?")):
        return values[0]  # "all-linear" or a regex
    return tuple(values)


def run(args: argparse.Namespace) -> int:
    try:
        result = plan(args.model, method=args.method, rank=args.rank, targets=_targets(args.targets),
                      batch_size=args.batch, seq_len=args.seq, grad_checkpointing=args.grad_checkpointing,
                      optimizer=args.optimizer, dtype=args.dtype, n_gpus=args.gpus,
                      budget_gib=args.gpu_gb, domain_shift=args.domain_shift)
    except ValueError as err:
        print(f"lorakit plan: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2) if args.json else render_plan(result))
    return 0
