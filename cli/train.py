"""`modification train`: train a MoD checkpoint's routers (and LoRA or every weight) with the transformers Trainer
(`modification.conversion.train.train`)."""

from __future__ import annotations

import os

from modification.conversion.settings import TrainSettings

HELP = "train routers (and LoRA or all weights) of a MoD checkpoint"
SETTINGS = TrainSettings


def run(settings: TrainSettings) -> None:
    from modification.conversion.train import train

    out = train(settings)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun only the main process reports
        print(f"wrote trained MoD checkpoint to {out}")
