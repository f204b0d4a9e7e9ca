"""`lorakit plan [CONFIG.yaml] [--set group.key=value ...]`: predict peak training memory and recommend
full fine-tuning, LoRA or QLoRA.

One vocabulary with `lorakit train`: the same config file, the same --set keys, the same validation
and the same errors (the config is read by `read_run_config`, as train reads it), planned by
lorakit.planner.plan_run. Today's flags are aliases of config keys:

    --model -> model.path (a planner preset such as llama-3.1-8b is accepted too)
    --method -> method          --rank -> lora.r          --targets -> lora.targets
    --batch -> train.batch_size --seq -> data.max_length  --dtype -> model.dtype
    --grad-checkpointing -> train.gradient_checkpointing

Defaults. With a CONFIG file, any --set, or no --model, the plan is the run `lorakit train` with the
same CONFIG and --set would do: RunConfig's defaults (the default model, batch 16 x 64 tokens,
float32, all-linear adapters), on the device train would pick (train.device; "auto": CUDA when
present). With --model and neither CONFIG nor --set, the flags keep the planner's defaults, a
typical fine-tuning step on a GPU: batch 1 x 2048 tokens, bfloat16, adapters on q_proj and v_proj,
CUDA.

--gpus N: N ranks. They shard the model when the run uses FSDP (train.strategy: fsdp; with flags only,
always); under DDP every rank holds the whole model, so each needs the one-GPU plan. --optimizer,
--gpu-gb, --domain-shift and --json are the planner's own options, not run settings.
"""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.cli.common import positive_int
from lorakit.config import METHODS, RunConfig, read_run_config
from lorakit.dtypes import ALIASES as DTYPE_ALIASES
from lorakit.dtypes import NAMES as DTYPE_NAMES
from lorakit.dtypes import canonical
from lorakit.planner import (
    OPTIMIZERS, arch_for_run, available_memory, memory_plan_line, plan_run, render_plan, run_device,
)

# flag (argparse dest) -> the run config key it sets
FLAG_KEYS = {
    "model": "model.path",
    "method": "method",
    "rank": "lora.r",
    "targets": "lora.targets",
    "batch": "train.batch_size",
    "seq": "data.max_length",
    "grad_checkpointing": "train.gradient_checkpointing",
    "dtype": "model.dtype",
}
# With --model and no CONFIG / --set: the planner's defaults where they differ from RunConfig's.
# lora.targets None: q_proj and v_proj (the planner's default, whatever the model family).
FLAG_DEFAULTS = {"model.dtype": "bfloat16", "data.max_length": 2048, "train.batch_size": 1, "lora.targets": None}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `plan` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="predict peak memory and recommend full / LoRA / QLoRA",
                              description=__doc__.splitlines()[0] + " " + __doc__.splitlines()[1],
                              epilog="Defaults: with CONFIG, --set or no --model, those of `lorakit train` "
                                     "(RunConfig); with --model alone, batch 1 x 2048 tokens, bfloat16, "
                                     "q_proj and v_proj, CUDA. See docs/planner.md.")
    p.add_argument("config", nargs="?", help="run config YAML, as `lorakit train CONFIG.yaml` takes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run setting, e.g. --set lora.r=32 --set method=qlora (repeatable)")
    p.add_argument("--model", help="model.path: a local model directory, a preset (e.g. llama-3.1-8b), "
                                    "a config.json or a hub id")
    p.add_argument("--method", choices=METHODS, help="method (default lora)")
    p.add_argument("--rank", type=int, help="lora.r (default 8)")
    p.add_argument("--targets", nargs="+",
                   help="lora.targets: module names, 'all-linear', or one regex")
    p.add_argument("--batch", type=int, help="train.batch_size: micro-batch per GPU")
    p.add_argument("--seq", type=int, help="data.max_length: tokens per sequence")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="train.gradient_checkpointing=true")
    p.add_argument("--dtype", choices=DTYPE_NAMES + tuple(DTYPE_ALIASES), help="model.dtype")
    p.add_argument("--gpus", type=positive_int, default=1,
                   help="ranks (torchrun's processes); they shard the model with FSDP (train.strategy: fsdp)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="planner only (train uses adamw)")
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
    return list(values)


def flag_settings(args: argparse.Namespace) -> dict[str, object]:
    """The run config keys the alias flags set ({"lora.r": 16} for --rank 16); ValueError when a
    --set gives the same key."""
    values = {"targets": _targets(args.targets), "dtype": canonical(args.dtype) if args.dtype else None}
    settings = {key: values.get(dest, getattr(args, dest)) for dest, key in FLAG_KEYS.items()
                if getattr(args, dest) is not None}
    set_keys = {item.partition("=")[0].strip() for item in args.overrides}
    for dest, key in FLAG_KEYS.items():
        if key in settings and key in set_keys:
            raise ValueError(f"--{dest.replace('_', '-')} and --set {key}=... both set {key}; give it once")
    return settings


def flags_only(args: argparse.Namespace) -> bool:
    """--model with neither CONFIG nor --set: the planner's defaults, not a run's."""
    return args.config is None and not args.overrides and args.model is not None


def resolve(args: argparse.Namespace) -> tuple[RunConfig, str, int]:
    """The run config, the device ("cuda" or "cpu") and the number of GPUs sharding the model."""
    settings = flag_settings(args)
    if flags_only(args):
        config = read_run_config(None, (), {**FLAG_DEFAULTS, **settings})
        return config, "cuda", args.gpus
    config = read_run_config(args.config, args.overrides, settings)
    return config, run_device(config), args.gpus if config.train.strategy == "fsdp" else 1


def run(args: argparse.Namespace) -> int:
    try:
        config, device, n_gpus = resolve(args)
        result = plan_run(config, arch_for_run(config), device, n_gpus, optimizer=args.optimizer,
                          budget_gib=args.gpu_gb, domain_shift=args.domain_shift, recommend=True)
    except ValueError as err:
        print(f"lorakit plan: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(render_plan(result))
    if not flags_only(args):  # the run's plan: say it as train will
        print()
        if args.gpus > 1 and n_gpus == 1:
            print(f"train.strategy={config.train.strategy}: each of the {args.gpus} ranks holds the whole "
                  "model and needs this plan (train.strategy=fsdp shards it)")
        import torch

        if device == "cpu" or torch.cuda.is_available():
            print(memory_plan_line(result, available_memory(torch.device(device)), device))
    return 0
