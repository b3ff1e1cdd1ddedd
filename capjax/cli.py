"""`capjax score | prune | eval | run`: thin argument parsing over the library's pure functions."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from capjax.errors import expected_error, one_line

COMMANDS = ("score", "prune", "eval", "run", "demo", "recover")


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
    args = None
    try:
        args = build_parser().parse_args(argv)  # building the --method choices imports CAPJAX_PLUGINS
        from capjax.sharding import maybe_initialize_distributed

        maybe_initialize_distributed()  # multi-host runs set CAPJAX_DISTRIBUTED=1 (docs/scale_out.md)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # Ctrl-C: the conventional status, one line, no traceback
        where = "capjax" if args is None else f"capjax {args.command}"
        again = (
            "; rerun the same command to resume (finished steps are reused)" if args and args.command == "run" else ""
        )
        print(f"{where}: interrupted{again}", file=sys.stderr)
        if argv is None:  # the process's own command line: end it now. XLA threads may still be
            sys.stdout.flush()  # compiling, and a normal interpreter exit then crashed (SIGSEGV, seen)
            sys.stderr.flush()
            os._exit(130)
        return 130
    except Exception as e:
        if not expected_error(e) or os.environ.get("CAPJAX_DEBUG") == "1":  # CAPJAX_DEBUG=1: every traceback
            raise
        where = "capjax" if args is None else f"capjax {args.command}"
        print(f"{where}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
