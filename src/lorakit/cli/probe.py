"""`lorakit probe [CONFIG.yaml] [--set group.key=value ...] [--steps N] [--full-lr LR] [--out DIR] [--json]`:
does LoRA train like full fine-tuning on this data? (lorakit.probe; docs/probe.md)."""

from __future__ import annotations

import json
import sys

from lorakit.cli.common import positive_int


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    import argparse
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number > 0 (a learning rate, e.g. 2e-4), got {text}")
    return value


def add_parser(sub) -> None:
    from lorakit.probe import DEFAULT_STEPS, FULL_LR_FACTOR

    p = sub.add_parser(
        "probe", help="compare LoRA with full fine-tuning on your data: verdict, rank and learning-rate advice",
        description="Run a short full fine-tuning reference and the configured LoRA/QLoRA run on identical "
                    "batches, then report the gap and a verdict (converges like full fine-tuning / lags: rank "
                    "too low / lags: learning rate too high / diverges), the effective rank of the full "
                    "fine-tuning update and a recommended rank, a learning-rate sweep and a capacity check. "
                    "See docs/probe.md.")
    p.add_argument("config", nargs="?", help="run config YAML, as `lorakit train CONFIG.yaml` takes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run setting, e.g. --set lora.r=32 (repeatable)")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                   help=f"optimizer steps of each run (default {DEFAULT_STEPS})")
    p.add_argument("--full-lr", type=positive_float, default=None,
                   help=f"learning rate of the full fine-tuning reference (default: train.lr x {FULL_LR_FACTOR:g})")
    p.add_argument("--out", help="directory to keep probe.json and probe.png in (created if missing)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (progress goes to stderr)")
    p.set_defaults(run=run)


def run(args) -> int:
    from lorakit.config import read_run_config
    from lorakit.probe import probe, render

    config = read_run_config(args.config, args.overrides)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    report = probe(config, args.steps, full_lr=args.full_lr, out=args.out, log=log)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0
