"""The `modification` command-line tool: convert a Llama-family model to Mixture-of-Depths, fit or train its routers,
calibrate it to a compute budget, evaluate and benchmark it against its base, and publish it to the Hub."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Iterable

from .commands import COMMANDS
from .options import add_settings_arguments, settings_from_args


def build_parser(commands: Iterable[str | None] | None = None) -> argparse.ArgumentParser:
    """The parser of every command; only those in `commands` (default: all) get their arguments, so that
    `modification --help` lists the commands without importing what their flags are declared by."""
    parser = argparse.ArgumentParser(prog="modification", description=__doc__, allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="more logging; errors with their traceback")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"{__package__}.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__, allow_abbrev=False,  # one name each
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(module=module)
        if commands is None or name in commands:
            if hasattr(module, "SETTINGS"):
                add_settings_arguments(p, module.SETTINGS)
            else:
                module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser([next((word for word in argv if word in COMMANDS), None)]).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    from huggingface_hub.errors import StrictDataclassError  # a config field set to a bad value

    from modification.conversion.progress import library_progress_bars

    module = args.module
    try:
        settings = settings_from_args(module.SETTINGS, args) if hasattr(module, "SETTINGS") else args
        with library_progress_bars(getattr(settings, "progress", True)):  # transformers' own bars follow the step's
            module.run(settings)
    except (ValueError, StrictDataclassError, FileExistsError, FileNotFoundError, OSError) as err:
        if args.verbose:
            raise
        print(f"modification {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
