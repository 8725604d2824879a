"""`modification card`: the model card (README.md) of a MoD checkpoint, every number from its results.json
(`modification.model_cards.card.render_card`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import add_overwrite_argument


def add_card_arguments(p: argparse.ArgumentParser) -> None:
    """The card options `card` and `push` share."""
    p.add_argument("--base-model", default=None,
                   help="the base model's Hub id for the card (default: from results.json or config.json)")
    p.add_argument("--license", default=None,
                   help="licence id for the card (default: the base model's card; 'other (unknown)' with a warning)")


def register(sub) -> None:
    p = sub.add_parser("card", help="render the model card (README.md) of a MoD checkpoint", description=__doc__)
    p.add_argument("--checkpoint", required=True, help="checkpoint folder or Hub id")
    p.add_argument("--repo-id", required=True, help="the Hub repo the card is for (org/name)")
    p.add_argument("--out", default=None,
                   help="where to write it (default: README.md in the checkpoint folder; - for stdout)")
    add_overwrite_argument(p, help="replace an existing card")
    add_card_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from modification.conversion.checkpoint import resolve_checkpoint
    from modification.model_cards.card import CARD_FILENAME, render_card

    if args.out is None and not Path(args.checkpoint).is_dir():
        raise ValueError("--out is needed when --checkpoint is a Hub id: the Hub cache is not a place to write cards")
    folder = resolve_checkpoint(args.checkpoint)
    card = render_card(folder, args.repo_id, base_model=args.base_model, license=args.license)
    if args.out == "-":
        sys.stdout.write(str(card))
        return
    out = Path(args.out) if args.out else folder / CARD_FILENAME
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    card.save(out)
    print(f"wrote the model card to {out}")
