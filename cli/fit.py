"""`modification fit`: routers set from a few passes on calibration text, no training, to a budget
(`fit_checkpoint`; what it measures and chooses is described in `conversion/fit.py`)."""

from __future__ import annotations

from modification.conversion.settings import FitSettings

HELP = "set routers from a few passes on calibration text (no training), to a budget"
SETTINGS = FitSettings


def run(settings: FitSettings) -> None:
    from modification.conversion.budget import fractions_text
    from modification.conversion.fit import fit_checkpoint

    record = fit_checkpoint(settings)
    fit = record["fit"]
    print(f"asked {settings.budget()}; chose the {fit['chosen_plan']} plan in {fit['seconds']:.0f} s")
    for name, plan in fit["plans"].items():
        if "loss_increase" in plan:
            print(f"  {name:6s} plan: loss +{plan['loss_increase']:.4f} nats/token, look-up accuracy "
                  f"{plan['lookup_accuracy']:.2f} (dense {plan['dense_lookup_accuracy']:.2f})"
                  + (" refused: breaks look-up" if plan["refused"] else "") + f"; {fractions_text(plan)}")
    shares = dict(zip(fit["plan"].get("routed_layers", []), fit["plan"].get("routed_share", [])))
    kinds = dict(zip(fit["plan"].get("routed_layers", []), fit["plan"].get("granularity", [])))
    print("routed layers (share of tokens that run, what the others skip): "
          + (", ".join(f"{j}: {shares[j]:.2f} {kinds[j]}" for j in shares) or "none"))
    print(f"planned: {fractions_text(fit['plan_fractions'])}" if fit["plan_fractions"] else "planned: dense")
    print(f"measured on calibration text: {fractions_text(record['measured'])}"
          + (f"; held out: {fractions_text(record['held_out'])}" if "held_out" in record else ""))
    print(f"wrote {settings.out}")
