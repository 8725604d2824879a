"""Threshold calibration: choose thresholds so that the executed compute on calibration text hits a budget.

The executed fraction is the share of token-layer work that runs: unrouted layers count fully, routed layer j counts
its routed fraction r_j. A target executed fraction f therefore asks each routed layer for
`r = (f * L - unrouted) / routed`. Per-layer calibration sets each layer's threshold to the gate quantile that routes
r of its tokens, layer by layer in order (a threshold changes what later layers see); global calibration bisects one
threshold for all layers.
"""

from __future__ import annotations

import math

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modification.modeling import MoDForCausalLM

from .local_paths import data_names
from .settings import CalibrateSettings


def routed_fraction_for_target(model: MoDForCausalLM, target: float) -> float:
    """The per-routed-layer fraction r that gives an executed fraction `target` for the whole model."""
    config = model.config
    n_layers, n_routed = config.num_hidden_layers, len(config.routed_layers)
    lowest = (n_layers - n_routed) / n_layers
    if not lowest < target <= 1.0:
        raise ValueError(
            f"target executed fraction must lie in ({lowest:.3f}, 1]: {n_layers - n_routed} of {n_layers} layers run "
            f"every token, got {target}"
        )
    return (target * n_layers - (n_layers - n_routed)) / n_routed


def _sink_positions(batch: dict, sink_tokens: int) -> torch.Tensor:
    """`[batch, seq]` bool: the attention-sink tokens of this batch (position ids below `sink_tokens`)."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids) if mask is None else mask.cumsum(-1) - 1
    return positions < sink_tokens


@torch.no_grad()
def _collect(model: MoDForCausalLM, batches: Sequence[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Router logits per layer of the valid tokens that the router decides (sinks run by rule and are left out),
    concatenated over batches, and the routed fraction of every layer."""
    logits: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    routed = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64)
    total = 0
    for batch in batches:
        out = model(**batch, use_cache=False, output_router_decisions=True, logits_to_keep=1)
        valid = batch.get("attention_mask")
        valid = torch.ones_like(batch["input_ids"], dtype=torch.bool) if valid is None else valid.bool()
        n = int(valid.sum())
        routed += out.routed_fraction.double().cpu() * n
        total += n
        decided = valid & ~_sink_positions(batch, model.config.routing_sink_tokens)
        for i, layer_logits in zip(model.config.routed_layers, out.router_logits):  # one per routed layer
            logits[i].append(layer_logits[decided.to(layer_logits.device)].float().cpu())
    return [torch.cat(x) if x else torch.empty(0) for x in logits], routed / max(total, 1)


def executed_fraction(routed_fraction: torch.Tensor) -> float:
    """Mean over layers of the routed fraction: the share of token-layer work that ran."""
    return float(routed_fraction.mean())


def quantile_logit(logits: torch.Tensor, fraction: float) -> float:
    """The logit `t` such that `fraction` of `logits` are `>= t` (just above the largest when `fraction` is 0)."""
    k = int(round(fraction * logits.numel()))
    if k <= 0:
        return logits.max().item() + 1e-3
    return torch.sort(logits, descending=True).values[k - 1].item()


def _quantile_threshold(logits: torch.Tensor, fraction: float) -> float:
    """The threshold p that routes `fraction` of the tokens with these router logits (sigmoid(logit) >= p).

    Works in logit space (the model compares logits against logit(p) in float64), so saturated gates still rank.
    """
    t = min(max(quantile_logit(logits, fraction), -30.0), 30.0)
    return 1.0 / (1.0 + math.exp(-t))


def _decided_share(batches: Sequence[dict], fraction: float, sink_tokens: int) -> float:
    """The share of router-decided tokens to route so that `fraction` of all valid tokens run (sinks always run)."""
    total = sinks = 0
    for batch in batches:
        valid = batch.get("attention_mask")
        valid = torch.ones_like(batch["input_ids"], dtype=torch.bool) if valid is None else valid.bool()
        total += int(valid.sum())
        sinks += int((valid & _sink_positions(batch, sink_tokens)).sum())
    decided = max(total - sinks, 1)
    return min(max((fraction * total - sinks) / decided, 0.0), 1.0)


@torch.no_grad()
def calibrate_thresholds(
    model: MoDForCausalLM,
    batches: Iterable[dict],
    target: float | None = None,
    per_layer: bool = True,
    progress: bool = True,
    bisection_steps: int = 24,
    routed_fractions: dict[int, float] | None = None,
) -> dict:
    """Set `model.config.router_threshold` so that the executed fraction on `batches` is about `target`.

    `batches` are model inputs (`input_ids` and optionally `attention_mask`). Per layer (the default), every routed
    layer gets the same routed fraction, or its own from `routed_fractions` (layer index -> fraction of its tokens that
    run it; `target` then follows from them). Returns the calibration record that is also stored in
    `model.config.calibration`.
    """
    if model.config.router_kind != "threshold":
        raise ValueError(f"calibration sets thresholds: router_kind must be 'threshold', not {model.config.router_kind!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of text")
    layers = model.config.routed_layers
    if routed_fractions is not None:
        if sorted(routed_fractions) != sorted(layers):
            raise ValueError(f"routed_fractions names layers {sorted(routed_fractions)}, the routed layers are {layers}")
        n_layers = model.config.num_hidden_layers
        target = (n_layers - len(layers) + sum(routed_fractions.values())) / n_layers
    elif target is None:
        raise ValueError("give a target executed fraction or per-layer routed_fractions")
    else:
        r = routed_fraction_for_target(model, target)
        routed_fractions = {j: r for j in layers}
    was_training = model.training
    model.eval()
    sink_tokens = model.config.routing_sink_tokens
    if per_layer:
        thresholds = [0.5] * len(layers)
        # Route everything downstream while calibrating layer j, then fix j and move on.
        lowest = 1e-12
        for j, layer_idx in enumerate(tqdm(layers, desc="calibrating layers", disable=not progress)):
            model.config.router_threshold = thresholds[:j] + [lowest] * (len(layers) - j)
            logits, _ = _collect(model, batches)
            share = _decided_share(batches, routed_fractions[layer_idx], sink_tokens)
            thresholds[j] = _quantile_threshold(logits[layer_idx], share)
        model.config.router_threshold = thresholds
    else:
        # Bisect in logit space: the executed fraction falls monotonically as the threshold rises.
        lo, hi = -30.0, 30.0
        for _ in tqdm(range(bisection_steps), desc="calibrating threshold", disable=not progress):
            mid = (lo + hi) / 2
            model.config.router_threshold = 1.0 / (1.0 + math.exp(-mid))
            _, routed = _collect(model, batches)
            if executed_fraction(routed) > target:
                lo = mid
            else:
                hi = mid
        model.config.router_threshold = 1.0 / (1.0 + math.exp(-(lo + hi) / 2))
    _, routed = _collect(model, batches)
    model.config.validate()
    record = {
        "target_executed_fraction": target,
        "measured_executed_fraction": round(executed_fraction(routed), 6),
        "per_layer_routed_fraction": [round(float(x), 6) for x in routed],
        "mode": "per_layer" if per_layer else "global",
        "tokens": int(sum(int(b["input_ids"].numel()) for b in batches)),
    }
    model.config.calibration = record
    model.train(was_training)
    return record


def planned_fractions(config, target: float) -> dict[int, float] | None:
    """Per-layer routed fractions for `target` that keep the proportions `modification fit` planned (its skipped work
    scaled to the new budget), or `None` for a checkpoint that was not fitted (every routed layer then gets the same
    fraction)."""
    fit = (config.calibration or {}).get("fit")
    if not fit or fit.get("routed_layers") != list(config.routed_layers):
        return None
    skip = {int(j): s for j, s in fit["planned_skip"].items()}
    budget = (1.0 - target) * config.num_hidden_layers
    total = sum(skip.values())
    if total <= 0 or budget > len(skip) + 1e-9:
        return None
    scale = budget / total
    if max(skip.values()) * scale > 1.0:  # cannot scale up past whole layers: spread the rest evenly instead
        return None
    return {j: 1.0 - s * scale for j, s in skip.items()}


def calibrate_checkpoint(settings: CalibrateSettings) -> dict:
    """Calibrate the thresholds of the checkpoint `settings.model` to `settings.executed_fraction` on
    `settings.data`; write it to `settings.out` (default: replace the input folder). A share of the blocks is held
    out and the fraction measured there is recorded too."""
    from transformers import AutoTokenizer

    from .atomic import atomic_output_dir
    from .checkpoint import load_mod_model, read_mod_config, resolve_checkpoint, save_checkpoint
    from .data import load_blocks, split_blocks
    from .results import RESULTS_FILENAME, update_results

    folder = resolve_checkpoint(settings.model)
    config = read_mod_config(folder)
    out, progress = settings.out, settings.progress
    if out is None and not Path(settings.model).is_dir():
        raise ValueError("calibrating a Hub checkpoint needs --out (the Hub cache is read-only)")
    dest = Path(out) if out is not None else folder
    if out is not None and dest.exists() and not settings.overwrite:
        raise FileExistsError(f"{dest} already exists; pass --overwrite to replace it")
    seq_len, target, per_layer = settings.seq_len, settings.executed_fraction, not settings.global_threshold
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}")
    tokenizer = AutoTokenizer.from_pretrained(folder, config=config)
    blocks = load_blocks(settings.data, tokenizer, seq_len, text_field=settings.text_field, split=settings.split,
                         dataset_config=settings.data_config, max_tokens_per_source=settings.max_blocks * seq_len,
                         progress=progress)
    blocks = torch.cat(blocks)[:settings.max_blocks]
    calib, held_out = split_blocks([blocks], settings.held_out_fraction)
    model, _ = load_mod_model(str(folder))
    batches = [{"input_ids": b[None]} for b in calib[0]]
    fractions = planned_fractions(model.config, target) if per_layer else None
    record = calibrate_thresholds(model, batches, None if fractions else target, per_layer=per_layer,
                                  progress=progress, routed_fractions=fractions)
    if held_out[0].shape[0]:
        _, routed = _collect(model, [{"input_ids": b[None]} for b in held_out[0]])
        record["held_out_executed_fraction"] = round(executed_fraction(routed), 6)
        record["held_out_tokens"] = int(held_out[0].numel())
    record["data"] = data_names(settings.data)
    fit = (read_mod_config(folder).calibration or {}).get("fit")
    if fit:
        record["fit"] = fit
    model.config.calibration = record
    with atomic_output_dir(dest, overwrite=True) as tmp:
        save_checkpoint(model, tmp, companions_from=folder)
        # not README.md: a model card shows numbers measured under the old thresholds
        for extra in ("results.json", "training_log.json"):
            if (folder / extra).is_file():
                (tmp / extra).write_bytes((folder / extra).read_bytes())
        if (folder / "adapter").is_dir():
            import shutil

            shutil.copytree(folder / "adapter", tmp / "adapter")
        # new thresholds: update_results drops quality and efficiency measured under the old ones, keeps training
        update_results(tmp / RESULTS_FILENAME, model.config, str(dest))
    return record
