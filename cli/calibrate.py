"""`modification calibrate`: thresholds set so that the executed compute on calibration text hits a budget
(`calibrate_checkpoint`)."""

from __future__ import annotations

from modification.conversion.settings import CalibrateSettings


HELP = "set thresholds so executed compute hits a target fraction"
SETTINGS = CalibrateSettings


def run(settings: CalibrateSettings) -> None:
    from modification.conversion.calibrate import calibrate_checkpoint

    record = calibrate_checkpoint(settings)
    held = record.get("held_out_executed_fraction")
    print(f"target executed fraction {record['target_executed_fraction']:.3f}: calibration text "
          f"{record['measured_executed_fraction']:.3f}" + (f", held-out text {held:.3f}" if held is not None else ""))
