"""`lorakit data [CONFIG.yaml] [--set group.key=value ...] [--json]`: the data pre-flight check.

Reads the run's data exactly as `lorakit train` with the same CONFIG and --set would (the config by
config.read_run_config, the data by training.setup.read_datasets, with the run's tokenizer), shows a
few examples as the model sees them (the supervised tokens in [brackets], green in a terminal; of a
preference pair, prompt + chosen and prompt + rejected) and runs every check of datacheck. Exit
status: 0 without errors (warnings are printed), 1 with errors (e.g. no end-of-turn token in the
labels, leakage above data.max_leakage), 2 when the config or the data cannot be read.
"""

from __future__ import annotations

import json
import sys

from lorakit.cli.common import positive_int
from lorakit.config import read_run_config


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="check a run's data before training (examples, lengths, EOS, leakage, ...)",
                       description=__doc__.splitlines()[0].split(": ", 1)[1] + ": "
                       + "the mistakes in a run's data that are not syntax errors.")
    p.add_argument("config", nargs="?", help="run config YAML, as `lorakit train CONFIG.yaml` takes")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one run setting, e.g. --set data.max_length=auto (repeatable)")
    p.add_argument("--examples", type=positive_int, default=3, help="training examples (or preference pairs) to show (default 3)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from lorakit.data import Dataset, derive_max_new_tokens, pack
    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit import datacheck
    from lorakit.training.setup import max_leakage, read_datasets, steps_for_epochs

    config = read_run_config(args.config, args.overrides)
    tokenizer = load_tokenizer(resolve_model_dir(config.model.path))
    train, validation, test = read_datasets(config, tokenizer)
    report = datacheck.check(tokenizer, train, validation, test, max_leakage(config), samples=args.examples,
                             colour=not args.json and sys.stdout.isatty())
    derived = {"data.max_length": train.max_length,
               "eval.max_new_tokens": config.eval.max_new_tokens if config.eval.max_new_tokens is not None
               else derive_max_new_tokens(test, tokenizer) if test else None,
               "train.steps": config.train.steps if config.train.epochs is None
               else steps_for_epochs(config, pack(train, train.max_length)
                                                  if config.data.packing and isinstance(train, Dataset) else train)}
    if args.json:
        print(json.dumps({**report.to_dict(), "run": derived}, indent=2))
    else:
        print(datacheck.render_report(report))
        print("the run: " + ", ".join(f"{k}={v}" for k, v in derived.items())
              + (" (on one process)" if config.train.epochs is not None else ""))
    return 1 if report.errors else 0
