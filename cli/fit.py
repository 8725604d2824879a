"""`modification fit`: routers set from a few passes on calibration text, no training, to a compute budget
(`fit_checkpoint`; what it measures and chooses is described in `conversion/fit.py`)."""

from __future__ import annotations

from modification.conversion.settings import FitSettings


HELP = "set routers from a few passes on calibration text (no training), to a budget"
SETTINGS = FitSettings


def run(settings: FitSettings) -> None:
    from modification.conversion.fit import fit_checkpoint

    record = fit_checkpoint(settings)
    fit = record["fit"]
    held = record.get("held_out_executed_fraction")
    print(f"routed layers {fit['routed_layers']} (planned skip per layer {fit['planned_skip']}); executed fraction "
          f"{record['measured_executed_fraction']:.3f} on calibration text"
          + (f", {held:.3f} held out" if held is not None else "") + f" ({fit['seconds']:.0f} s); wrote {settings.out}")
