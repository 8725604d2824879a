"""Threshold calibration: choose thresholds so that a model's routing on calibration text hits a budget.

The budget is a KV fraction (K/V entries written over the dense model's: the routed share averaged over every layer,
unrouted layers counting 1) or a FLOP fraction at a context length (`conversion/budget.py`). Per-layer calibration
brings the checkpoint's `RoutingPlan` to the budget (`Budget.scale`: a fit's plan keeps its proportions; a checkpoint
without one spreads the budget evenly over its routed layers) and sets each layer's threshold to the gate quantile
that routes its planned share of the tokens, layer by layer in order (a threshold changes what later layers see), all
in one forward pass over the calibration text.
Global calibration bisects one threshold for all layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modification.modeling import THRESHOLD_LOGIT_LIMIT, MoDForCausalLM, RoutingPlan, logit_to_threshold

from .budget import Budget, checkpoint_plan, measured_plan, plan_fractions
from .local_paths import data_names
from .settings import CalibrateSettings


def valid_tokens(batch: dict) -> torch.Tensor:
    """`[batch, seq]` bool: the tokens of `batch` that are not padding."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()


def sink_tokens(model: MoDForCausalLM, batch: dict) -> torch.Tensor:
    """`[batch, seq]` bool: the attention sinks of `batch`, as the routers mark them (`MoDRouter.sink_mask`)."""
    routers = [layer.router for layer in model.model.layers if layer.has_router]
    if not routers:
        return torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    return routers[0].sink_mask(None, valid_tokens(batch))


def _positions(batch: dict) -> dict:
    """`position_ids` counted from each sequence's first real token (as generation passes them under left padding),
    for a batch with a padding mask; nothing to add for one without."""
    mask = batch.get("attention_mask")
    return {} if mask is None else {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}


@torch.no_grad()
def _collect(model: MoDForCausalLM, batches: Sequence[dict]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Router logits per layer of the valid tokens that the router decides (sinks run by rule and are left out),
    concatenated over batches, and the routed fraction of every layer."""
    logits: list[list[torch.Tensor]] = [[] for _ in range(model.config.num_hidden_layers)]
    routed = torch.zeros(model.config.num_hidden_layers, dtype=torch.float64)
    total = 0
    for batch in batches:
        out = model(**batch, **_positions(batch), use_cache=False, output_router_decisions=True, logits_to_keep=1)
        valid = valid_tokens(batch)
        n = int(valid.sum())
        routed += out.routed_fraction.double().cpu() * n
        total += n
        decided = valid & ~sink_tokens(model, batch)
        for i, layer_logits in zip(model.config.routed_layers, out.router_logits):  # one per routed layer
            logits[i].append(layer_logits[decided.to(layer_logits.device)].float().cpu())
    return [torch.cat(x) if x else torch.empty(0) for x in logits], routed / max(total, 1)


def _one_batch(batches: Sequence[dict]) -> dict:
    """Every sequence of `batches` in one batch: their real tokens, right-padded (with a mask) to the longest."""
    rows = [ids[valid] for batch in batches for ids, valid in zip(batch["input_ids"], valid_tokens(batch))]
    width = max(len(row) for row in rows)
    if all(len(row) == width for row in rows):
        return {"input_ids": torch.stack(rows)}
    ids = torch.zeros(len(rows), width, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return {"input_ids": ids, "attention_mask": mask}


def quantile_logit(logits: torch.Tensor, fraction: float) -> float:
    """The logit `t` such that `fraction` of `logits` are `>= t` (just above the largest when `fraction` is 0)."""
    k = int(round(fraction * logits.numel()))
    if k <= 0:
        return logits.max().item() + 1e-3
    return torch.sort(logits, descending=True).values[k - 1].item()


def _decided_share(model: MoDForCausalLM, batches: Sequence[dict], fraction: float) -> float:
    """The share of router-decided tokens to route so that `fraction` of all valid tokens run (sinks always run)."""
    total = sinks = 0
    for batch in batches:
        total += int(valid_tokens(batch).sum())
        sinks += int(sink_tokens(model, batch).sum())
    decided = max(total - sinks, 1)
    return min(max((fraction * total - sinks) / decided, 0.0), 1.0)


@torch.no_grad()
def calibrate_thresholds(
    model: MoDForCausalLM,
    batches: Iterable[dict],
    budget: Budget | None = None,
    plan: RoutingPlan | None = None,
    per_layer: bool = True,
    progress: bool = True,
    bisection_steps: int = 24,
) -> dict:
    """Set `model.config.router_threshold` so that the routing on `batches` hits `budget`, or `plan`.

    `batches` are model inputs (`input_ids` and optionally `attention_mask`). Per layer (the default), each routed
    layer routes its share of `plan` (default: the checkpoint's plan brought to `budget`, `Budget.scale`); globally,
    one threshold is bisected until the measured routing gives `budget`. The plan (per layer: the one calibrated to;
    globally: the one measured) goes to `model.config.routing_plan`. Returns the calibration record that is also
    stored in `model.config.calibration`: the budget, the plan's KV and FLOP fractions (`planned`) and those measured
    on `batches` (`measured`).
    """
    config = model.config
    if config.router_kind != "threshold":
        raise ValueError(f"calibration sets thresholds: router_kind must be 'threshold', not {config.router_kind!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch of text")
    if per_layer and plan is None:
        if budget is None:
            raise ValueError("give a budget or a plan to calibrate to")
        plan = budget.scale(checkpoint_plan(config), config)
    if not per_layer and budget is None:
        raise ValueError("global calibration bisects one threshold to a budget: give one")
    layers = config.routed_layers
    if plan is not None and list(plan.routed_layers) != list(layers):
        raise ValueError(f"the plan routes layers {list(plan.routed_layers)}, the model routes {layers}")
    was_training = model.training
    model.eval()
    if per_layer:
        # One forward pass over every sequence at once: each router, just before it decides, gets the threshold that
        # routes its planned share of the tokens it sees, with every earlier layer already routing at its own.
        share = {j: _decided_share(model, batches, r) for j, r in zip(plan.routed_layers, plan.routed_share)}
        config.router_threshold = [0.5] * len(layers)

        def set_threshold(router, args) -> None:
            hidden_states, position_ids, valid = args[:3]
            decided = ~router.sink_mask(position_ids, valid)
            decided = decided if valid is None else decided & valid
            logits = router.score(hidden_states)[decided]
            thresholds = list(config.router_threshold)
            thresholds[layers.index(router.layer_idx)] = logit_to_threshold(
                quantile_logit(logits, share[router.layer_idx]))
            config.router_threshold = thresholds

        routers = [model.model.layers[j].router for j in layers]
        handles = [router.register_forward_pre_hook(set_threshold) for router in routers]
        try:
            everything = _one_batch(batches)
            model(**everything, **_positions(everything), use_cache=False, logits_to_keep=1)
        finally:
            for handle in handles:
                handle.remove()
    else:
        # Bisect in logit space: the budget's fraction falls monotonically as the threshold rises.
        lo, hi = -THRESHOLD_LOGIT_LIMIT, THRESHOLD_LOGIT_LIMIT
        for _ in tqdm(range(bisection_steps), desc="calibrating threshold", disable=not progress):
            mid = (lo + hi) / 2
            config.router_threshold = logit_to_threshold(mid)
            _, routed = _collect(model, batches)
            if budget.of(measured_plan(config, routed), config) > budget.target:
                lo = mid
            else:
                hi = mid
        config.router_threshold = logit_to_threshold((lo + hi) / 2)
    _, routed = _collect(model, batches)
    measured = measured_plan(config, routed)
    config.routing_plan = (plan if per_layer else measured).to_dict()
    config.validate()
    record = {
        "budget": budget.record() if budget is not None else None,
        "mode": "per_layer" if per_layer else "global",
        "planned": plan_fractions(plan, config) if per_layer else None,
        "measured": plan_fractions(measured, config),
        "per_layer_routed_fraction": [round(float(x), 6) for x in routed],
        "tokens": int(sum(int(b["input_ids"].numel()) for b in batches)),
    }
    config.calibration = record
    model.train(was_training)
    return record


def recalibrate_after_training(model: MoDForCausalLM, blocks: Sequence[torch.Tensor], budget: Budget | None,
                               blocks_per_source: int = 4) -> dict | None:
    """Calibrate a trained model's thresholds again, to `budget` (or, without one, to the checkpoint's plan), on
    `blocks_per_source` blocks spread over each source's `[n, seq_len]` training blocks: training moves the gates,
    and the thresholds measured before it no longer give the budget. Returns the calibration record, or None where
    there is nothing to calibrate to (no threshold routers, or neither a budget nor a plan)."""
    config = model.config
    nothing_to_aim_at = budget is None and config.routing_plan is None
    if config.router_kind != "threshold" or not config.routed_layers or nothing_to_aim_at:
        return None
    device = next(model.parameters()).device
    batches = [{"input_ids": block[None].to(device)} for source in blocks if source.shape[0]
               for block in source[torch.linspace(0, source.shape[0] - 1, min(blocks_per_source, source.shape[0]))
                                   .round().long()]]
    plan = None if budget is not None else checkpoint_plan(config)
    return calibrate_thresholds(model, batches, budget, plan=plan, progress=False)


def calibrate_checkpoint(settings: CalibrateSettings) -> dict:
    """Calibrate the thresholds of the checkpoint `settings.model` to the budget of `settings` on `settings.data`;
    write it to `settings.out` (default: replace the input folder). A share of the blocks is held out and what the
    routing gives there is recorded too (`held_out`)."""
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
    seq_len = settings.seq_len
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    tokenizer = AutoTokenizer.from_pretrained(folder, config=config)
    blocks = load_blocks(settings.data, tokenizer, seq_len, text_field=settings.text_field, split=settings.split,
                         dataset_config=settings.data_config, max_tokens_per_source=settings.max_blocks * seq_len,
                         progress=progress)
    blocks = torch.cat(blocks)[:settings.max_blocks]
    calib, held_out = split_blocks([blocks], settings.held_out_fraction)
    model, _ = load_mod_model(str(folder))
    batches = [{"input_ids": b[None]} for b in calib[0]]
    record = calibrate_thresholds(model, batches, settings.budget(), per_layer=not settings.global_threshold,
                                  progress=progress)
    if held_out[0].shape[0]:
        _, routed = _collect(model, [{"input_ids": b[None]} for b in held_out[0]])
        record["held_out"] = plan_fractions(measured_plan(model.config, routed), model.config)
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
