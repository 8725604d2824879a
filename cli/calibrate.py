"""`modification calibrate`: thresholds set so that the executed compute on calibration text hits a budget
(`calibrate_checkpoint`)."""

from __future__ import annotations

import argparse

from .options import add_model_argument, add_out_argument, add_overwrite_argument, add_settings_arguments, \
    settings_from_args


def register(sub) -> None:
    from modification.conversion.settings import CalibrateSettings

    p = sub.add_parser("calibrate", help="set thresholds so executed compute hits a target fraction",
                       description=__doc__)
    add_model_argument(p)
    add_settings_arguments(p, CalibrateSettings, "calibration")
    add_out_argument(p, required=False, help="output folder (default: update --model in place)")
    add_overwrite_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from modification.conversion.calibrate import calibrate_checkpoint
    from modification.conversion.settings import CalibrateSettings

    record = calibrate_checkpoint(args.model, settings_from_args(CalibrateSettings, args), out=args.out,
                                  overwrite=args.overwrite)
    held = record.get("held_out_executed_fraction")
    print(f"target executed fraction {record['target_executed_fraction']:.3f}: calibration text "
          f"{record['measured_executed_fraction']:.3f}" + (f", held-out text {held:.3f}" if held is not None else ""))
