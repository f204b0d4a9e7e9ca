"""`lorakit train [CONFIG.yaml] [--set group.key=value ...] [--out DIR] [--resume DIR]`."""

from __future__ import annotations

import os
import time
from pathlib import Path

from lorakit.config import RunConfig, read_run_config


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a causal LM with LoRA, QLoRA or in full",
        description="Fine-tune a causal LM. With no arguments: LoRA on SmolLM2-135M-Instruct, teaching it "
                    "the built-in 'stardate' task, with a before/after evaluation on held-out data.")
    p.add_argument("config", nargs="?", help="YAML file with groups model, lora, data, train, eval (and method)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set lora.r=32 --set method=qlora (repeatable)")
    p.add_argument("--out", help="run directory (default: runs/<date>-<time>-<method>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (lorakit's or transformers'): a log line per logged step instead")
    p.set_defaults(run=run)


def resolve(args) -> tuple[RunConfig, Path, bool]:
    """The config, the run directory and whether to resume; errors before any model is loaded."""
    from lorakit.training.run_dir import check_run_dir

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ValueError(f"--resume {run_dir}: no config.yaml there; is it a lorakit run directory?")
        if args.config or args.overrides or args.out:
            raise ValueError("--resume continues a run with its saved config.yaml; drop CONFIG, --set and --out")
        return read_run_config(saved), run_dir, True
    config = read_run_config(args.config, args.overrides)
    run_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.method}")
    if os.environ.get("RANK", "0") == "0":  # under torchrun the others would find rank 0's lock and files
        check_run_dir(run_dir, resume=False)
    return config, run_dir, False


def run(args) -> int:
    from lorakit.monitor import STOPPED
    from lorakit.training import train

    config, run_dir, resume = resolve(args)
    if args.no_progress:  # transformers' bars too (loading the weights): a log gets lines, not redraws
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(f"run directory: {run_dir}")
    try:
        summary = train(config, run_dir, resume=resume, progress=not args.no_progress)
    except OSError as e:  # the file system refused: a full disk, a directory that cannot be written
        raise ValueError(str(e)) from e
    return 1 if any(d["kind"] in STOPPED for d in summary["diagnostics"]) else 0
