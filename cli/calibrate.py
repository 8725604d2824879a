"""`modification calibrate`: thresholds set so that the routing on calibration text hits a budget
(`calibrate_checkpoint`)."""

from __future__ import annotations

from modification.conversion.settings import CalibrateSettings

HELP = "set thresholds so that the routing hits a budget (KV fraction, or FLOP fraction at a context length)"
SETTINGS = CalibrateSettings


def run(settings: CalibrateSettings) -> None:
    from modification.conversion.budget import fractions_text
    from modification.conversion.calibrate import calibrate_checkpoint

    record = calibrate_checkpoint(settings)
    print(f"asked {settings.budget()}: calibration text {fractions_text(record['measured'])}"
          + (f"; held-out text {fractions_text(record['held_out'])}" if "held_out" in record else ""))
