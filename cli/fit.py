"""`modification fit`: routers set from a few passes on calibration text, no training, to a compute budget
(`fit_checkpoint`; what it measures and chooses is described in `conversion/fit.py`)."""

from __future__ import annotations

import argparse

from .options import (
    add_model_argument, add_out_argument, add_overwrite_argument, add_progress_argument, add_settings_arguments,
    settings_from_args,
)


def register(sub) -> None:
    from modification.conversion.settings import FitSettings

    p = sub.add_parser("fit", help="set routers from a few passes on calibration text (no training), to a budget",
                       description=__doc__)
    add_model_argument(p, "MoD checkpoint (from `convert`): folder or Hub id")
    add_out_argument(p)
    add_settings_arguments(p, FitSettings, "fit")
    add_overwrite_argument(p)
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from modification.conversion.fit import fit_checkpoint
    from modification.conversion.settings import FitSettings

    record = fit_checkpoint(args.model, args.out, settings_from_args(FitSettings, args), overwrite=args.overwrite,
                            progress=not args.no_progress)
    fit = record["fit"]
    held = record.get("held_out_executed_fraction")
    print(f"routed layers {fit['routed_layers']} (planned skip per layer {fit['planned_skip']}); executed fraction "
          f"{record['measured_executed_fraction']:.3f} on calibration text"
          + (f", {held:.3f} held out" if held is not None else "") + f" ({fit['seconds']:.0f} s); wrote {args.out}")
