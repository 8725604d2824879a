"""`modification train`: train a MoD checkpoint's routers (and LoRA or every weight) with the transformers Trainer
(`modification.conversion.train.train`); every `TrainSettings` field is a flag of the same name."""

from __future__ import annotations

import argparse
import os

from .options import add_model_argument, add_out_argument, add_overwrite_argument, add_settings_arguments, \
    settings_from_args


def register(sub) -> None:
    from modification.conversion.settings import TrainSettings

    p = sub.add_parser("train", help="train routers (and LoRA or all weights) of a MoD checkpoint", description=__doc__)
    add_model_argument(p)
    add_out_argument(p, help="output folder for the trained, standalone checkpoint")
    add_settings_arguments(p, TrainSettings, "training")
    p.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default: <out>-checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --checkpoint-dir")
    p.add_argument("--save-adapter", action="store_true", help="also write the LoRA adapter to <out>/adapter")
    add_overwrite_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from modification.conversion.settings import TrainSettings
    from modification.conversion.train import train

    out = train(args.model, args.out, settings_from_args(TrainSettings, args), checkpoint_dir=args.checkpoint_dir,
                resume=args.resume, save_adapter=args.save_adapter, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun only the main process reports
        print(f"wrote trained MoD checkpoint to {out}")
