"""`capjax score | prune | eval | run`: thin argument parsing over the library's pure functions."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("score", "prune", "eval", "run", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capjax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"capjax.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"capjax.commands.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from capjax.memory import InsufficientMemoryError
    from capjax.sharding import maybe_initialize_distributed

    try:
        maybe_initialize_distributed()  # multi-host runs set CAPJAX_DISTRIBUTED=1 (docs/scale_out.md)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, InsufficientMemoryError) as e:  # bad input: one clear line, no traceback
        print(f"capjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
