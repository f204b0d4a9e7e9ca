"""`lorakit` command line: a thin layer over the Python API, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module in lorakit.cli exposing add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "inspect": "inspect",
    "plan": "plan",
    "probe": "probe",
    "data": "data",
    "train": "train",
    "merge": "merge",
    "generate": "generate",
    "chat": "generate",
    "eval": "eval",
    "quantize": "quantize",
    "export": "export",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        importlib.import_module(f"lorakit.cli.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        code = args.run(args)
    except (ValueError, TypeError, OSError) as e:
        # A user's input (ValueError/TypeError name the value and the rule) or a file the command
        # could not read or write. Anything else is a bug in lorakit and keeps its traceback.
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        code = 2
    from lorakit.distributed import exit_process

    exit_process(code)  # under torchrun only
    return code


if __name__ == "__main__":
    sys.exit(main())
