"""Cheap routers: set a MoD model's routers from a few forward and backward passes on calibration text, no training.

What was measured on a real pretrained model (SmolLM2-135M-Instruct; docs/results.md) decided each step:

1. **Which layers** (`routed_layers="auto"`): the cost of a layer is how much the calibration loss rises when every
   token but the attention sinks skips it (one forward pass per layer). Layers whose removal is ruinous (the first
   ones and the last ones on SmolLM2) are never routed; the rest are ranked by the measured cost of routing them.
2. **What a router predicts**: the expected change of the model's predictions when a token skips the layer, a
   label-free Fisher score `E_y[(dL_y/dh_out . delta)^2]` with labels `y` drawn from the model's own predictions
   (`label_samples` backward passes). The signed first-order loss change on the true next tokens is a far better
   oracle, but it depends on the label, and a linear router cannot predict it from the layer's input (Spearman 0.03
   on held-out text); the Fisher score is predictable (Spearman 0.22) and beats random routing. "How little the layer
   changes the token" is what a router fits best, but keeps the wrong tokens. Each router is a ridge regression of the
   Gaussian-ranked score on its RMS-normalised input (exactly what `MoDRouter.score` computes).
3. **Attention sinks**: the first `routing_sink_tokens` positions run every layer; skipping them cost more than all
   other choices together (random routing of 8 layers: 80 -> 67 perplexity with 4 sinks kept).
4. **Where the budget goes**: costs of skipping tokens in several layers compound while deleting layers compounds
   less, so three plans are built from the ranked layers, calibrated and measured whole on the calibration text, and
   the best is kept: token routing (each of the cheapest layers skips up to `max_skip` of its tokens), whole layers
   (the cheapest layers skipped by every token but the sinks, a fractional rest routed), and a mix of the two.
5. **Thresholds**: calibrated layer by layer in order, with earlier layers already routing, to the planned fractions
   (`calibrate.calibrate_thresholds` with per-layer targets); `fit_checkpoint` then folds each threshold into its
   router bias, so every routed layer keeps `p = 0.5` and gates are centred on the decision boundary for any later
   training.

The measurements of 1 and 2 do not depend on the target: a sweep over targets takes them once (`measure_layers`) and
hands them to every fit (`fit_routers(..., measured=...)`) rather than measuring again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modification.modeling import MoDConfig, MoDForCausalLM

from .local_paths import data_names
from .settings import FitSettings, data_fields

@dataclass
class FitRecord:
    """What `fit_routers` measured and chose (stored in `config.calibration["fit"]` and results.json)."""

    settings: dict
    layer_removal_cost: list[float]
    routed_layers: list[int]
    planned_skip: dict[str, float]
    plan_loss_increase: dict[str, float] = field(default_factory=dict)
    chosen_plan: str = ""
    calibration_tokens: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------


def _sink_mask(batch: dict, sink_tokens: int) -> torch.Tensor:
    ids = batch["input_ids"]
    return (torch.arange(ids.shape[1], device=ids.device) < sink_tokens).expand_as(ids)


@torch.no_grad()
def mean_loss(model: MoDForCausalLM, batches: Sequence[dict]) -> float:
    """Mean next-token loss (nats per token) of `model` on `batches` (the LM loss alone, not the routing objective)."""
    total, count = 0.0, 0
    for batch in batches:
        out = model(**batch, labels=batch["input_ids"], use_cache=False, output_router_logits=True)
        n = batch["input_ids"][:, 1:].numel()
        total += float(out.lm_loss) * n
        count += n
    return total / max(count, 1)


class _SkipLayer:
    """A forward hook that makes one decoder layer a no-op for every token except the sinks (the layer still runs:
    this is a measurement, not a speed-up)."""

    def __init__(self, layer: torch.nn.Module, sinks: int):
        self.sinks = sinks
        self.handle = layer.register_forward_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out, decision = output
        keep = torch.zeros(hidden_in.shape[:2], dtype=torch.bool, device=hidden_in.device)
        keep[:, : self.sinks] = True
        return torch.where(keep[..., None], hidden_out, hidden_in), decision

    def remove(self) -> None:
        self.handle.remove()


def layer_removal_costs(
    model: MoDForCausalLM, batches: Sequence[dict], sink_tokens: int, progress: bool = True
) -> list[float]:
    """For every layer, the rise of the mean loss (nats/token) when every token but the sinks skips it alone."""
    base = mean_loss(model, batches)
    costs = []
    for layer in tqdm(model.model.layers, desc="measuring layer costs", disable=not progress):
        hook = _SkipLayer(layer, sink_tokens)
        try:
            costs.append(mean_loss(model, batches) - base)
        finally:
            hook.remove()
    return costs


def fisher_scores(
    model: MoDForCausalLM, batches: Sequence[dict], layers: Sequence[int], samples: int = 2, seed: int = 0
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per layer in `layers`: the inputs `[tokens, hidden]` (float32) and each token's Fisher score `[tokens]`.

    The score is `E_y[(g_y . delta)^2]`: `delta` is what the layer adds to the token's residual stream, `g_y` the
    gradient of the sequence loss w.r.t. the layer's output under labels `y` sampled from the model's own predictions.
    It estimates (twice) how far the model's predictions move when the token skips the layer, without using labels.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    scores: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # gradients w.r.t. activations only
    try:
        for batch in batches:
            acc: dict[int, torch.Tensor] = {}
            for _ in range(samples):
                store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

                def hook(module, args, kwargs, output, j=None):
                    hidden_in = args[0] if args else kwargs["hidden_states"]
                    hidden_out = output[0]
                    hidden_out.retain_grad()
                    store[j] = (hidden_in.detach(), hidden_out)

                handles = [
                    model.model.layers[j].register_forward_hook(
                        lambda m, a, k, o, j=j: hook(m, a, k, o, j=j), with_kwargs=True
                    )
                    for j in layers
                ]
                # a leaf that requires grad at the embeddings, so the backward pass reaches every layer
                embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
                try:
                    logits = model(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                                   use_cache=False).logits.float()
                finally:
                    for h in handles:
                        h.remove()
                with torch.no_grad():
                    probs = torch.softmax(logits.view(-1, logits.shape[-1]), -1)
                    labels = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:2])
                loss = torch.nn.functional.cross_entropy(
                    logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="sum"
                )
                loss.backward()
                for j, (hidden_in, hidden_out) in store.items():
                    s = (hidden_out.grad * (hidden_out.detach() - hidden_in)).sum(-1).pow(2).reshape(-1)
                    acc[j] = s if j not in acc else acc[j] + s
            for j, (hidden_in, _) in store.items():
                inputs[j].append(hidden_in.reshape(-1, hidden_in.shape[-1]).float())
                scores[j].append(acc[j] / samples)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return ({j: torch.cat(v) for j, v in inputs.items()}, {j: torch.cat(v) for j, v in scores.items()})


def _gaussian_ranks(y: torch.Tensor) -> torch.Tensor:
    ranks = y.argsort().argsort().double()
    return torch.special.ndtri((ranks + 0.5) / len(y)).float()


@torch.no_grad()
def fit_router_weights(
    router: torch.nn.Module, inputs: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor, ridge: float,
    logit_scale: float,
) -> None:
    """Set `router.weight`/`router.bias` to a ridge regression of the Gaussian-ranked `scores` on the router's own
    RMS-normalised `inputs` (tokens in `keep` only: the sinks are routed by rule, not by score)."""
    x = inputs[keep].double()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + router.eps)
    t = _gaussian_ranks(scores[keep]).double()
    x_mean, t_mean = x.mean(0), t.mean()
    xc = x - x_mean
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(xc.T @ xc + ridge * len(x) * eye, xc.T @ (t - t_mean))
    pred = xc @ w
    scale = logit_scale / pred.std().clamp(min=1e-12)
    router.weight.copy_((w * scale).to(router.weight.dtype)[None])
    router.bias.fill_(float(-(x_mean @ w) * scale))  # centred; calibration moves the bias to the threshold


# --------------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------------


def with_routed_layers(model: MoDForCausalLM, layers: list[int], **routing) -> MoDForCausalLM:
    """The same weights under a config that routes `layers` (new routers start at zero weight), plus `routing`."""
    config_dict = model.config.to_dict()
    config_dict.update(routed_layers=sorted(layers), router_threshold=0.5, **routing)
    for key in ("architectures", "auto_map", "transformers_version", "model_type"):
        config_dict.pop(key, None)
    config = MoDConfig(**config_dict)
    new = MoDForCausalLM(config).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
    new.load_state_dict(state, strict=False)
    new.generation_config = model.generation_config
    return new.eval()


def _run_every_token(router: torch.nn.Module) -> None:
    router.weight.data.zero_()
    router.bias.data.fill_(30.0)


def measuring_model(model: MoDForCausalLM, sink_tokens: int) -> MoDForCausalLM:
    """What the fit measures on: `model`'s weights with every layer routed and every router running every token."""
    model = with_routed_layers(model, list(range(model.config.num_hidden_layers)), routing_sink_tokens=sink_tokens)
    for layer in model.model.layers:
        _run_every_token(layer.router)
    return model


@dataclass
class LayerMeasurements:
    """What `fit_routers` measures on the dense model (`measuring_model`): the removal cost of every layer and, for
    the layers it may route, the Fisher scores the routers regress on. None of it depends on the target executed
    fraction: a sweep over targets measures once (`measure_layers`) and passes the result to every fit."""

    removal_costs: list[float]  # per layer, `layer_removal_costs`
    routing_sink_tokens: int  # the sinks the costs were measured with
    label_samples: int  # the Fisher scores' backward passes
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # per scored layer, `fisher_scores`
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def check(self, n_layers: int, settings: FitSettings) -> None:
        """A clear error when these measurements were taken on another model or under other settings."""
        if len(self.removal_costs) != n_layers:
            raise ValueError(f"the measurements hold {len(self.removal_costs)} layer costs, the model has {n_layers} "
                             "layers")
        for name in ("routing_sink_tokens", "label_samples"):
            if getattr(self, name) != getattr(settings, name):
                raise ValueError(f"the measurements were taken with {name}={getattr(self, name)}, the fit asks for "
                                 f"{getattr(settings, name)}")

    def with_scores(self, model: MoDForCausalLM, batches: Sequence[dict], layers: Sequence[int]) -> LayerMeasurements:
        """These measurements plus the Fisher scores of those `layers` not scored yet, measured on `model`."""
        missing = [j for j in layers if j not in self.scores]
        if not missing:
            return self
        inputs, scores = fisher_scores(model, batches, missing, samples=self.label_samples)
        return replace(self, inputs={**self.inputs, **inputs}, scores={**self.scores, **scores})


def measure_layers(
    model: MoDForCausalLM, batches: Sequence[dict], settings: FitSettings, progress: bool = True
) -> LayerMeasurements:
    """Every layer's removal cost and Fisher scores on `batches`, for fits of `model` to several targets."""
    batches = list(batches)
    dense = measuring_model(model, settings.routing_sink_tokens)
    costs = layer_removal_costs(dense, batches, settings.routing_sink_tokens, progress=progress)
    measured = LayerMeasurements(costs, settings.routing_sink_tokens, settings.label_samples)
    return measured.with_scores(dense, batches, range(len(costs)))


def routable_layers(costs: Sequence[float], settings: FitSettings) -> list[int]:
    """The layers a fit may route, cheapest first: with `routed_layers="auto"` every layer whose removal costs at
    most `ruinous_factor` times the median layer's, else the layers `settings` names."""
    n_layers = len(costs)
    if settings.routed_layers == "auto":
        median = sorted(costs)[n_layers // 2]
        candidates = [j for j in range(n_layers) if costs[j] <= settings.ruinous_factor * max(median, 1e-6)]
    else:
        candidates = [int(j) for j in settings.routed_layers]
        bad = [j for j in candidates if not 0 <= j < n_layers]
        if bad:
            raise ValueError(f"routed layers {bad} do not exist: the model has {n_layers} layers")
    return sorted(candidates, key=lambda j: costs[j])


def fit_layer_routers(
    model: MoDForCausalLM, layers: Sequence[int], measured: LayerMeasurements, batches: Sequence[dict],
    settings: FitSettings,
) -> None:
    """Set the routers of `layers` by `fit_router_weights` from `measured` (taken on `batches`); the sinks are left
    out of the regression, they run by rule."""
    keep = torch.cat([~_sink_mask(b, settings.routing_sink_tokens).reshape(-1) for b in batches])
    for j in layers:
        fit_router_weights(model.model.layers[j].router, measured.inputs[j], measured.scores[j], keep, settings.ridge,
                           settings.logit_scale)


def fit_routers(
    model: MoDForCausalLM, batches: Sequence[dict], settings: FitSettings, progress: bool = True,
    measured: LayerMeasurements | None = None,
) -> tuple[MoDForCausalLM, FitRecord]:
    """Route `model` to the executed fraction `settings.executed_fraction` from measurements on `batches` (see the
    module docstring).

    `measured`: the measurements of `measure_layers` on the same model, batches and settings, when several fits
    share them (a sweep over targets); the fit then measures only the Fisher scores they lack, and its result is the
    one it reaches measuring everything itself. Returns a model (a new one: its routed layers may change) with
    fitted routers and calibrated thresholds, and the record of what was measured.
    """

    start = time.perf_counter()
    if not 0.0 < settings.executed_fraction <= 1.0:
        raise ValueError(f"executed_fraction must lie in (0, 1], got {settings.executed_fraction}")
    if not 0.0 < settings.max_skip <= 1.0:
        raise ValueError(f"max_skip must lie in (0, 1], got {settings.max_skip}")
    if model.config.router_kind != "threshold":
        raise ValueError("fitting sets threshold routers: router_kind must be 'threshold', not "
                         f"{model.config.router_kind!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("fitting routers needs at least one batch of calibration text")
    n_layers = model.config.num_hidden_layers
    model = measuring_model(model, settings.routing_sink_tokens)  # every token runs while measuring
    if measured is None:
        costs = layer_removal_costs(model, batches, settings.routing_sink_tokens, progress=progress)
        measured = LayerMeasurements(costs, settings.routing_sink_tokens, settings.label_samples)
    measured.check(n_layers, settings)
    costs = measured.removal_costs
    ranked = routable_layers(costs, settings)
    budget = (1.0 - settings.executed_fraction) * n_layers
    record = FitRecord(settings=fit_settings_record(settings), layer_removal_cost=[round(c, 5) for c in costs],
                       routed_layers=[], planned_skip={},
                       calibration_tokens=sum(int(b["input_ids"].numel()) for b in batches))
    if budget <= 1e-9:
        model = with_routed_layers(model, [], routing_sink_tokens=settings.routing_sink_tokens)
        record.seconds = round(time.perf_counter() - start, 1)
        return model, record

    # Fit the routers of the cheapest candidates (enough of them to hold the budget at max_skip, and a margin).
    needed = math.ceil(budget / settings.max_skip)
    if needed > len(ranked):
        raise ValueError(
            f"executed_fraction {settings.executed_fraction} needs {budget:.2f} layers' worth of skipped work, more "
            f"than {len(ranked)} routable layers at max_skip={settings.max_skip} give; raise executed_fraction or "
            "max_skip"
        )
    fitted_layers = sorted(ranked[: min(len(ranked), 2 * needed)])
    fit_layer_routers(model, fitted_layers, measured.with_scores(model, batches, fitted_layers), batches, settings)
    fitted = {j: model.model.layers[j].router.weight.detach().clone() for j in fitted_layers}
    for j in fitted_layers:  # every token runs again while the plans are measured against the dense model
        _run_every_token(model.model.layers[j].router)

    # Candidate plans (layer -> share of its tokens skipped), each calibrated and measured whole on the calibration
    # text, because costs do not add up: skipping tokens in several layers compounds, deleting layers less so.
    plans = {
        "tokens": _plan_tokens(ranked, budget, settings.max_skip, fitted),
        "layers": _plan_layers(ranked, budget, fitted),
        "mixed": _plan_mixed(ranked, budget, settings.max_skip, fitted),
    }
    plan_losses: dict[str, float] = {}
    best = None
    base_loss = mean_loss(model, batches)
    for name, plan in tqdm(plans.items(), desc="measuring plans", disable=not progress):
        candidate = model_for_plan(model, plan, fitted, settings, batches)
        loss = mean_loss(candidate, batches)
        plan_losses[name] = round(loss - base_loss, 5)
        if best is None or loss < best[0]:
            best = (loss, name, candidate, plan)
    _, chosen, new, plan = best
    record.routed_layers = sorted(plan)
    record.planned_skip = {str(j): round(plan[j], 4) for j in sorted(plan)}
    record.plan_loss_increase = plan_losses
    record.chosen_plan = chosen
    record.seconds = round(time.perf_counter() - start, 1)
    new.config.calibration = {**(new.config.calibration or {}), "fit": asdict(record)}
    return new, record


def _plan_tokens(ranked: list[int], budget: float, max_skip: float, fitted: dict) -> dict[int, float]:
    """Token routing only: the cheapest layers each skip `max_skip` of their tokens, the last one what is left."""
    plan, left = {}, budget
    for j in ranked:
        if left <= 1e-9:
            break
        if j in fitted:
            plan[j] = min(max_skip, left)
            left -= plan[j]
    return plan


def _plan_layers(ranked: list[int], budget: float, fitted: dict) -> dict[int, float]:
    """Whole layers: the cheapest layers are skipped by every token but the sinks; a fractional rest is routed."""
    plan, left = {}, budget
    for j in ranked:
        if left <= 1e-9:
            break
        if left >= 1.0 - 1e-9 or j in fitted:
            plan[j] = min(1.0, left)
            left -= plan[j]
    return plan


def _plan_mixed(ranked: list[int], budget: float, max_skip: float, fitted: dict) -> dict[int, float]:
    """Half the budget (in whole layers) from skipping the cheapest layers, the rest from token routing in the next."""
    whole = math.floor(budget / 2)
    plan = {j: 1.0 for j in ranked[:whole]}
    plan.update(_plan_tokens([j for j in ranked if j not in plan], budget - whole, max_skip, fitted))
    return plan


def model_for_plan(
    model: MoDForCausalLM, plan: dict[int, float], weights: dict[int, torch.Tensor], settings: FitSettings,
    batches: Sequence[dict],
) -> MoDForCausalLM:
    """A model routing the layers of `plan` (layer -> share of its tokens skipped) with the router `weights`, its
    thresholds calibrated layer by layer to the plan on `batches`."""
    from .calibrate import calibrate_thresholds

    new = with_routed_layers(model, sorted(plan), routing_sink_tokens=settings.routing_sink_tokens)
    with torch.no_grad():
        for j in plan:
            router = new.model.layers[j].router
            if plan[j] < 1.0 - 1e-9:
                router.weight.copy_(weights[j])  # else skipped whole (but its sinks): a zero weight scores nothing
            router.bias.zero_()
    calibrate_thresholds(new, batches, routed_fractions={j: 1.0 - plan[j] for j in plan}, progress=False)
    return new


def fold_thresholds_into_biases(model: MoDForCausalLM) -> None:
    """Move each routed layer's threshold into its router bias (`logit >= logit(p)` <=> `logit - logit(p) >= 0`), so
    every threshold is the paper's p = 0.5 and the gates are centred on the decision boundary."""
    thresholds = model.config.router_threshold
    layers = model.config.routed_layers
    thresholds = thresholds if isinstance(thresholds, list) else [thresholds] * len(layers)
    with torch.no_grad():
        for j, p in zip(layers, thresholds):
            model.model.layers[j].router.bias.sub_(math.log(p) - math.log1p(-p))
    model.config.router_threshold = 0.5


def calibration_batches(
    data: list[str], tokenizer, seq_len: int, blocks_per_source: int, held_out_fraction: float,
    text_field: str = "text", split: str = "train", data_config: str | None = None, progress: bool = True,
) -> tuple[list[dict], list[dict]]:
    """Blocks spread evenly over each source (not just its first pages), split into calibration and held-out."""
    from .data import load_blocks, split_blocks

    sources = load_blocks(data, tokenizer, seq_len, text_field=text_field, split=split, dataset_config=data_config,
                          max_tokens_per_source=16 * blocks_per_source * seq_len, progress=progress)
    picked = []
    for blocks in sources:
        n = min(blocks_per_source, blocks.shape[0])
        picked.append(blocks[torch.linspace(0, blocks.shape[0] - 1, n).round().long()])
    calib, held = split_blocks(picked, held_out_fraction)
    as_batches = lambda parts: [{"input_ids": b[None]} for part in parts for b in part]  # noqa: E731
    return as_batches(calib), as_batches(held)


def fit_settings_record(settings: FitSettings) -> dict:
    """The settings as the fit record stores them: what the fit does (the data sources are recorded apart, by name)."""
    return {k: v for k, v in settings.recorded().items() if k not in data_fields()}


def fit_checkpoint(settings: FitSettings) -> dict:
    """Fit the routers of the MoD checkpoint `settings.model` to `settings.executed_fraction` on `settings.data` and
    write the routed checkpoint to `settings.out`.

    Returns the calibration record (with the fit record under `"fit"`, and the executed fraction measured on the
    held-out blocks)."""
    from transformers import AutoTokenizer

    from .calibrate import _collect, executed_fraction
    from .atomic import atomic_output_dir
    from .checkpoint import load_mod_model, read_mod_config, resolve_checkpoint, save_checkpoint
    from .results import RESULTS_FILENAME, update_results

    folder = resolve_checkpoint(settings.model)
    config = read_mod_config(folder)  # a clear error for a non-MoD folder before anything is read
    out, progress = Path(settings.out), settings.progress
    if out.exists() and not settings.overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if settings.seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={settings.seq_len} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    tokenizer = AutoTokenizer.from_pretrained(folder, config=config)  # config: no custom-code prompt
    calib, held = calibration_batches(settings.data, tokenizer, settings.seq_len, settings.blocks_per_source,
                                      settings.held_out_fraction, settings.text_field, settings.split,
                                      settings.data_config, progress)
    model, _ = load_mod_model(str(folder), dtype=torch.float32)
    model, record = fit_routers(model, calib, settings, progress=progress)
    fold_thresholds_into_biases(model)
    calibration = dict(model.config.calibration or {})
    if held:
        _, routed = _collect(model, held)
        calibration["held_out_executed_fraction"] = round(executed_fraction(routed), 6)
        calibration["held_out_tokens"] = int(sum(b["input_ids"].numel() for b in held))
    calibration["data"] = data_names(settings.data)
    model.config.calibration = calibration
    with atomic_output_dir(out, overwrite=settings.overwrite) as tmp:
        save_checkpoint(model, tmp, companions_from=folder)
        update_results(tmp / RESULTS_FILENAME, model.config, str(out), extra={"fit": asdict(record)})
    return calibration
