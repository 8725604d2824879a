"""`modification show-routing`: where the tokens of a text go, as a token x layer map (PNG), a hover page (HTML) and
per-layer bars (`modification.evaluation.plots.show_routing`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_device_arguments, add_model_argument


def register(sub) -> None:
    p = sub.add_parser("show-routing", help="token x layer routing map of a text (PNG + HTML) and per-layer bars",
                       description=__doc__)
    add_model_argument(p)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to route")
    text.add_argument("--text-file", help="read the text from this file")
    p.add_argument("--max-tokens", type=int, default=256, help="route at most this many tokens (default 256)")
    p.add_argument("--out", default="routing", help="output folder (default ./routing)")
    add_device_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict[str, Path]:
    from modification.evaluation.plots import show_routing

    if args.text_file is not None:
        if not Path(args.text_file).is_file():
            raise FileNotFoundError(f"no text file at {args.text_file}")
        text = Path(args.text_file).read_text(encoding="utf-8", errors="replace")
    else:
        text = args.text
    if not text or not text.strip():
        raise ValueError("the text is empty: give --text with some words or a non-empty --text-file")
    files = show_routing(args.model, text, args.out, max_tokens=args.max_tokens, device=args.device,
                         dtype=args.dtype)
    for path in files.values():
        print(f"wrote {path}")
    return files
