"""Budgets that say what they save: a step is asked for one of them, and reports all of them.

- the **KV fraction**: K/V entries written over the dense model's (memory; `RoutingPlan.kv_fraction`);
- the **FLOP fraction at a context length T**: executed over dense FLOPs of a prefill of T tokens, attention counted
  with its T dependence, the LM head included (`RoutingPlan.flop_fraction`, `MoDConfig.prefill_flops`).

A per-layer `RoutingPlan` (stored in `MoDConfig.routing_plan` by `fit`, scaled by `calibrate`, held by `train`) is
brought to a budget by `Budget.scale`; `plan_fractions` is what records show of a plan, next to the budget asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the settings import this module: the model (torch) is imported where a plan is made
    from modification.modeling import MoDConfig, RoutingPlan


# The context lengths every record states a plan's FLOP fraction at: short context, and long context (where attention,
# which grows with T, is most of a layer's work).
REPORTED_CONTEXT_LENGTHS = (512, 4096)


@dataclass(frozen=True)
class Budget:
    """One budget: `kv_fraction`, or `flop_fraction` of a prefill of `context_length` tokens (the settings fields
    `kv_fraction` / `flop_fraction` + `flop_context_length`, checked there)."""

    kv_fraction: float | None = None
    flop_fraction: float | None = None
    context_length: int | None = None

    def of(self, plan: RoutingPlan, config: MoDConfig) -> float:
        """What `plan` gives in this budget's unit."""
        if self.kv_fraction is not None:
            return plan.kv_fraction()
        return plan.flop_fraction(config, self.context_length)

    @property
    def target(self) -> float:
        return self.kv_fraction if self.kv_fraction is not None else self.flop_fraction

    def scale(self, plan: RoutingPlan, config: MoDConfig) -> RoutingPlan:
        """`plan` brought to this budget (`RoutingPlan.scaled`: every routed layer's skipped share times one factor)."""
        if self.kv_fraction is not None:
            return plan.scaled(kv_fraction=self.kv_fraction)
        return plan.scaled(flop_fraction=self.flop_fraction, config=config, context_length=self.context_length)

    def record(self) -> dict:
        """The budget as records store it: the settings fields it came from."""
        if self.kv_fraction is not None:
            return {"kv_fraction": self.kv_fraction}
        return {"flop_fraction": self.flop_fraction, "flop_context_length": self.context_length}

    def __str__(self) -> str:
        if self.kv_fraction is not None:
            return f"kv_fraction={self.kv_fraction}"
        return f"flop_fraction={self.flop_fraction} at flop_context_length={self.context_length}"


def checkpoint_plan(config: MoDConfig) -> RoutingPlan:
    """The checkpoint's `routing_plan` (a fit's), or for a checkpoint without one every routed layer alike: a plan that
    skips nothing, which `scaled` spreads evenly over the routed layers."""
    from modification.modeling import RoutingPlan

    if config.routing_plan is not None:
        return RoutingPlan.from_config(config)
    return RoutingPlan.from_config(config, 1.0)


def measured_plan(config: MoDConfig, routed_fraction) -> RoutingPlan:
    """The plan a model ran: its routed layers with the routed fractions measured (`routed_fraction`, one per layer of
    the model, as `MoDModel` returns it)."""
    from modification.modeling import RoutingPlan

    if len(routed_fraction) != config.num_hidden_layers:
        raise ValueError(f"{len(routed_fraction)} routed fractions for {config.num_hidden_layers} layers")
    return RoutingPlan.from_config(config, [min(1.0, float(routed_fraction[j])) for j in config.routed_layers])


def plan_fractions(plan: RoutingPlan, config: MoDConfig) -> dict:
    """What `plan` saves, as records show it: its KV fraction and its FLOP fraction at `REPORTED_CONTEXT_LENGTHS`."""
    out = {"kv_fraction": round(plan.kv_fraction(), 6)}
    for length in REPORTED_CONTEXT_LENGTHS:
        out[f"flop_fraction_at_{length}"] = round(plan.flop_fraction(config, length), 6)
    return out


def fractions_text(fractions: dict) -> str:
    """`plan_fractions` in words: "KV 0.800, FLOPs 0.874 at 512, 0.812 at 4096"."""
    flops = ", ".join(f"{fractions[f'flop_fraction_at_{n}']:.3f} at {n}" for n in REPORTED_CONTEXT_LENGTHS)
    return f"KV {fractions['kv_fraction']:.3f}, FLOPs {flops}"
