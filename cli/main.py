"""The `modification` command-line tool: convert a Llama-family model to Mixture-of-Depths, fit or train its routers,
calibrate it to a compute budget, evaluate and benchmark it against its base, and publish it to the Hub."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="modification", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging; errors with their traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in dict.fromkeys(COMMANDS.values()):  # each module once, in the order of COMMANDS
        importlib.import_module(f"{__package__}.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded with the numbers it produced
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from huggingface_hub.errors import StrictDataclassError  # a config field set to a bad value

    from modification.conversion.progress import library_progress_bars

    try:
        with library_progress_bars(not getattr(args, "no_progress", False)):
            args.func(args)
    except (ValueError, StrictDataclassError, FileExistsError, FileNotFoundError, OSError) as err:
        if args.verbose:
            raise
        print(f"modification {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
