"""`modification card`: the model card (README.md) of a MoD checkpoint, every number from its results.json
(`modification.model_cards.card.write_card`)."""

from __future__ import annotations

from modification.model_cards.settings import CardSettings

HELP = "render the model card (README.md) of a MoD checkpoint"
SETTINGS = CardSettings


def run(settings: CardSettings) -> None:
    from modification.model_cards.card import write_card

    path = write_card(settings)
    if path is not None:
        print(f"wrote the model card to {path}")
