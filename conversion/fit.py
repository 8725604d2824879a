"""Cheap routers: set a MoD model's routers from a few forward and backward passes on calibration text, no training.

What was measured on a real pretrained model (SmolLM2-135M-Instruct; docs/results.md and issue 18) decided each step:

1. **What a skipped token leaves out** (`routing_granularity`): its attention sub-layer only (it writes no K/V and
   still runs the MLP) or the whole block. Removing attention costs far less quality than removing whole blocks for
   the same K/V saved (SmolLM2, 4 layers: 1.21x against 2.10x perplexity), so `attention` is the default; with `auto`
   the fit measures both per layer and takes, per layer, the one whose removal costs less (both save all of the
   layer's K/V, so "less per K/V saved" is "less").
2. **Which layers** (`routed_layers="auto"`): the cost of a layer is how much the calibration loss rises when every
   token but the attention sinks skips it (the router's `override="skip"`; one forward pass per layer and
   granularity). Layers whose removal is ruinous (the first ones and the last ones on SmolLM2) are never routed.
3. **Look-up** (`min_lookup_share`): perplexity hides a model that can no longer copy from its context (SmolLM2's
   layer 16 costs the least perplexity of all 30 layers, and skipping it drops copying a repeated passage from 0.8
   to 0.02). So each candidate layer's skip is also scored on `conversion.lookup`'s repeated passage (random tokens
   of the calibration text, repeated one calibration block later; one batched forward pass per layer), and a layer
   that keeps less than `min_lookup_share` of the dense model's accuracy is never routed.
4. **What a router predicts**: the expected change of the model's predictions when a token skips what its layer
   skips, a label-free Fisher score `E_y[(dL_y/dh . delta)^2]` (`delta`: what the block, or the attention sub-layer,
   adds to the token's residual stream; `h`: the hidden state after it) with labels `y` drawn from the model's own
   predictions (`label_samples` backward passes). The signed first-order loss change on the true next tokens is a
   better oracle, but a linear router cannot predict it from the layer's input (Spearman 0.03 on held-out text); the
   Fisher score is predictable (Spearman 0.22) and beats random routing. Each router is a ridge regression of the
   Gaussian-ranked score on the router's own features (`MoDRouter.features`).
5. **Attention sinks**: the first `routing_sink_tokens` positions run every layer (`MoDRouter.sink_mask`); skipping
   them cost more than all other choices together (random routing of 8 layers: 80 -> 67 perplexity with 4 sinks).
6. **Where the budget goes**: costs of skipping tokens in several layers compound while deleting layers compounds
   less, so three `RoutingPlan`s are built from the ranked layers, each at the budget (`kv_fraction`, or
   `flop_fraction` at `flop_context_length`), calibrated and measured whole on the calibration text: token routing
   (each of the cheapest layers skips up to `max_skip` of its tokens), whole layers (the cheapest layers skipped by
   every token but the sinks, a fractional rest routed), and a mix of the two. A plan whose look-up accuracy falls
   below `min_lookup_share` of the dense model's is refused; of the others the one with the lowest loss is kept.
7. **Thresholds**: calibrated layer by layer in order, with earlier layers already routing, to the plan
   (`calibrate.calibrate_thresholds`); `fit_checkpoint` then folds each threshold into its router bias, so every
   routed layer keeps `p = 0.5` and gates are centred on the decision boundary for any later training. The plan is
   stored in `config.routing_plan`: `calibrate` scales it to a new budget, `train` holds each layer at its share.

The measurements of 1-4 do not depend on the budget: a sweep over budgets takes them once (`measure_layers`) and
hands them to every fit (`fit_routers(..., measured=...)`) rather than measuring again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modification.modeling import THRESHOLD_LOGIT_LIMIT, MoDConfig, MoDForCausalLM, RoutingPlan

from .budget import Budget, plan_fractions
from .calibrate import calibrate_thresholds, sink_tokens, valid_tokens
from .local_paths import data_names
from .lookup import repeated_passage_batch, repeated_passage_scores
from .settings import FitOptions, FitSettings, data_fields

GRANULARITIES = ("attention", "block")
# The look-up guard protects look-up only where the dense model has it: a model that copies less than this share of a
# repeated passage (a tiny or random one) has none to lose, and its accuracies are noise.
LOOKUP_GUARD_MIN_ACCURACY = 0.1


@dataclass
class FitRecord:
    """What `fit_routers` measured and chose (stored in `config.calibration["fit"]` and results.json)."""

    settings: dict
    budget: dict  # the budget asked for (`Budget.record`)
    removal_cost: dict[str, list[float]]  # per granularity measured: per layer, the loss rise when skipped whole
    lookup_accuracy: dict  # "dense": the dense model's; per granularity: per layer skipped whole (None: not measured)
    layer_granularity: dict[str, str]  # per routable layer, what its tokens skip
    refused_layers: dict[str, str]  # per layer never routed, why
    routed_layers: list[int]
    plan: dict  # the chosen `RoutingPlan.to_dict()`
    plan_fractions: dict  # its KV fraction and FLOP fractions (`budget.plan_fractions`)
    plans: dict[str, dict] = field(default_factory=dict)  # per candidate plan: loss increase, look-up, fractions
    chosen_plan: str = ""
    calibration_tokens: int = 0
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------


def decided_tokens(model: MoDForCausalLM, batches: Sequence[dict]) -> torch.Tensor:
    """`[tokens]` bool over the flattened `batches`: the valid tokens a router decides (the sinks run by rule)."""
    return torch.cat([(valid_tokens(b) & ~sink_tokens(model, b)).reshape(-1) for b in batches])


@torch.no_grad()
def layer_inputs(model: MoDForCausalLM, batch: dict) -> tuple[torch.Tensor, ...]:
    """The hidden states of `batch` at the input of every layer of `model` (entry j: layer j's input; one forward
    pass), from which `running_from(model, j)` goes on."""
    return model(**batch, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[:-1]


@contextmanager
def running_from(model: MoDForCausalLM, layer: int):
    """`model` without its layers before `layer`: fed the input of `layer` (`layer_inputs`) as `inputs_embeds`, it
    computes what the whole model computes. A measurement that changes layer j alone leaves every layer before it as
    it was, so it runs from layer j on (on average half the model)."""
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList(list(layers)[layer:])
    try:
        yield model
    finally:
        model.model.layers = layers


@torch.no_grad()
def mean_loss(model: MoDForCausalLM, batches: Sequence[dict], inputs: Sequence[tuple] | None = None,
              layer: int = 0) -> float:
    """Mean next-token loss (nats per token) of `model` on `batches` (the LM loss alone, not the routing objective);
    with `inputs` (each batch's `layer_inputs`), run from `layer` on."""
    total, count = 0.0, 0
    with running_from(model, layer):
        for i, batch in enumerate(batches):
            feed = {"input_ids": batch["input_ids"]} if inputs is None else {"inputs_embeds": inputs[i][layer]}
            out = model(**feed, attention_mask=batch.get("attention_mask"), labels=batch["input_ids"],
                        use_cache=False, output_router_logits=True)
            n = batch["input_ids"][:, 1:].numel()
            total += float(out.lm_loss) * n
            count += n
    return total / max(count, 1)


@dataclass
class LookupCheck:
    """The look-up check of a fit: `conversion.lookup`'s repeated passages (`ids`, `[trials, distance + passage]`),
    each passage of `passage_tokens` repeated `distance` tokens after its first copy."""

    ids: torch.Tensor
    passage_tokens: int

    @classmethod
    def from_batches(cls, batches: Sequence[dict], options: FitOptions, max_positions: int) -> LookupCheck:
        """Passages drawn from the calibration text, repeated one calibration block later (at most half a block long,
        and within the model's positions), the text itself the filler."""
        distance = batches[0]["input_ids"].shape[1]
        passage = max(2, min(options.lookup_passage_tokens, distance // 2))
        distance = max(passage, min(distance, max_positions - passage))
        filler = torch.cat([b["input_ids"][valid_tokens(b)] for b in batches])
        return cls(repeated_passage_batch(filler, distance, passage, options.lookup_trials), passage)

    def accuracy(self, model: MoDForCausalLM, inputs: tuple | None = None, layer: int = 0) -> float:
        """Top-1 accuracy of `model` on the second copies (one batched forward pass); with `inputs` (the passages'
        `layer_inputs`), run from `layer` on."""
        with running_from(model, layer):
            return repeated_passage_scores(model, self.ids, self.passage_tokens, batch_size=len(self.ids),
                                           inputs_embeds=None if inputs is None else inputs[layer])["accuracy"]


@contextmanager
def skipping(model: MoDForCausalLM, layer: int, granularity: str):
    """Every token but the sinks skips `granularity` ("attention" or "block") of `layer` of the measuring model (its
    router's `override="skip"`; every other router of it runs every token)."""
    router, config = model.model.layers[layer].router, model.config
    before = config.routing_granularity
    config.routing_granularity, router.override = granularity, "skip"
    try:
        yield
    finally:
        config.routing_granularity, router.override = before, "run"


def layer_removal_costs(
    model: MoDForCausalLM, batches: Sequence[dict], granularity: str, progress: bool = True
) -> list[float]:
    """For every layer of the measuring model, the rise of the mean loss (nats/token) when every token but the sinks
    skips its `granularity` alone."""
    base = mean_loss(model, batches)
    inputs = [layer_inputs(model, batch) for batch in batches]
    costs = []
    for j in tqdm(range(len(model.model.layers)), desc=f"measuring layer costs ({granularity})", disable=not progress):
        with skipping(model, j, granularity):
            costs.append(mean_loss(model, batches, inputs, j) - base)
    return costs


def layer_lookup_accuracy(
    model: MoDForCausalLM, lookup: LookupCheck, layers: Sequence[int], granularity: str, progress: bool = True
) -> dict[int, float]:
    """For each of `layers` of the measuring model, the look-up accuracy when every token but the sinks skips its
    `granularity` alone."""
    inputs = layer_inputs(model, {"input_ids": lookup.ids})
    accuracy = {}
    for j in tqdm(layers, desc=f"measuring look-up ({granularity})", disable=not progress):
        with skipping(model, j, granularity):
            accuracy[j] = lookup.accuracy(model, inputs, j)
    return accuracy


def fisher_scores(
    model: MoDForCausalLM, batches: Sequence[dict], layers: Sequence[int], samples: int = 2, seed: int = 0
) -> tuple[dict[int, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """Per layer in `layers` of the measuring model: its inputs `[tokens, hidden]` (float32) and each token's Fisher
    score `[tokens]` per granularity.

    The score is `E_y[(g_y . delta)^2]`: for "block", `delta` is what the layer adds to the token's residual stream and
    `g_y` the gradient of the sequence loss w.r.t. the layer's output; for "attention", `delta` is what the attention
    sub-layer adds and `g_y` the gradient w.r.t. the hidden state after it (the MLP's input). Labels `y` are sampled
    from the model's own predictions. It estimates (twice) how far the model's predictions move when the token skips
    that part of the layer, without using labels.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    scores: dict[int, dict[str, list[torch.Tensor]]] = {j: {g: [] for g in GRANULARITIES} for j in layers}
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # gradients w.r.t. activations only
    try:
        for batch in batches:
            acc: dict[tuple[int, str], torch.Tensor] = {}
            for _ in range(samples):
                hidden: dict[tuple[int, str], torch.Tensor] = {}

                def kept(tensor: torch.Tensor, key: tuple) -> None:
                    tensor.retain_grad()
                    hidden[key] = tensor

                def on_output(module, args, kwargs, output, j: int) -> None:
                    hidden[j, "in"] = (args[0] if args else kwargs["hidden_states"]).detach().flatten(0, 1)
                    kept(output[0], (j, "out"))

                handles = []
                for j in layers:
                    layer = model.model.layers[j]
                    handles.append(layer.register_forward_hook(
                        lambda m, a, k, o, j=j: on_output(m, a, k, o, j), with_kwargs=True))
                    # the MLP's input, packed: the hidden state after attention, which holds what attention added
                    handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
                        lambda m, a, j=j: kept(a[0], (j, "mid"))))
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
                for j in layers:
                    h_in, mid, out = hidden[j, "in"], hidden[j, "mid"], hidden[j, "out"]
                    added = {"block": (out.grad.flatten(0, 1), out.detach().flatten(0, 1) - h_in),
                             "attention": (mid.grad, mid.detach() - h_in)}
                    for g, (grad, delta) in added.items():
                        s = (grad * delta).sum(-1).pow(2)
                        acc[j, g] = s if (j, g) not in acc else acc[j, g] + s
            for j in layers:
                inputs[j].append(hidden[j, "in"].float())
                for g in GRANULARITIES:
                    scores[j][g].append(acc[j, g] / samples)
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)
    return ({j: torch.cat(v) for j, v in inputs.items()},
            {j: {g: torch.cat(v) for g, v in per.items()} for j, per in scores.items()})


def _gaussian_ranks(y: torch.Tensor) -> torch.Tensor:
    ranks = y.argsort().argsort().double()
    return torch.special.ndtri((ranks + 0.5) / len(y)).float()


@torch.no_grad()
def regressed_router_weight(
    router: torch.nn.Module, inputs: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor, ridge: float,
    logit_scale: float,
) -> torch.Tensor:
    """A router weight `[1, hidden]`: the ridge regression of the Gaussian-ranked `scores` on the router's features
    of `inputs` (tokens in `keep` only: the sinks are routed by rule, not by score), scaled so that the logits have
    standard deviation `logit_scale`. The bias is left to calibration (it sets the threshold)."""
    x = router.features(inputs[keep]).double()
    t = _gaussian_ranks(scores[keep]).double()
    xc, tc = x - x.mean(0), t - t.mean()
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.solve(xc.T @ xc + ridge * len(x) * eye, xc.T @ tc)
    scale = logit_scale / (xc @ w).std().clamp(min=1e-12)
    return (w * scale).to(router.weight.dtype)[None]


# --------------------------------------------------------------------------------------------------------------------
# The measuring model and what is measured on it
# --------------------------------------------------------------------------------------------------------------------


def with_plan(model: MoDForCausalLM, plan: RoutingPlan, **routing) -> MoDForCausalLM:
    """The same weights under a config that routes as `plan` (its layers, their granularities, `routing_plan`;
    thresholds 0.5; new routers start at zero weight), plus the config fields `routing`."""
    config_dict = model.config.to_dict()
    config_dict.update({"router_threshold": 0.5, "load_loss_target": None, **plan.config_fields(), **routing})
    for key in ("architectures", "auto_map", "transformers_version", "model_type"):
        config_dict.pop(key, None)
    new = MoDForCausalLM(MoDConfig(**config_dict)).to(next(model.parameters()).dtype)
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
    new.load_state_dict(state, strict=False)
    new.generation_config = model.generation_config
    return new.eval()


def measuring_model(model: MoDForCausalLM, sink_tokens: int) -> MoDForCausalLM:
    """What the fit measures on: `model`'s weights with every layer routed and every router's `override="run"` (the
    dense model; `skipping` makes one layer skip)."""
    n_layers = model.config.num_hidden_layers
    every = RoutingPlan(n_layers, range(n_layers), [1.0] * n_layers, ["block"] * n_layers)
    model = with_plan(model, every, routing_sink_tokens=sink_tokens, routing_granularity="block", routing_plan=None)
    for layer in model.model.layers:
        layer.router.override = "run"
    return model


class LookupBroken(ValueError):
    """Every plan `fit_routers` found at the budget fails the look-up guard (`FitOptions.min_lookup_share`)."""


@dataclass
class LayerMeasurements:
    """What `fit_routers` measures on the dense model (`measuring_model`): per granularity the removal cost of every
    layer and the look-up accuracy of the layers it may route, and for the layers it fits routers for, the Fisher
    scores the routers regress on. None of it depends on the budget: a sweep over budgets measures once
    (`measure_layers`) and passes the result to every fit, which measures only what it lacks."""

    routing_sink_tokens: int  # the sinks everything was measured with
    label_samples: int  # the Fisher scores' backward passes
    lookup_passage_tokens: int  # the look-up check's passages and how many
    lookup_trials: int
    removal_costs: dict[str, list[float]] = field(default_factory=dict)  # per granularity, `layer_removal_costs`
    dense_lookup: float | None = None  # the dense model's look-up accuracy
    lookup: dict[str, dict[int, float]] = field(default_factory=dict)  # per granularity and layer skipped
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # per scored layer, `fisher_scores`
    scores: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def taken_with(cls, options: FitOptions) -> LayerMeasurements:
        """No measurement yet, for a fit with `options`."""
        return cls(options.routing_sink_tokens, options.label_samples, options.lookup_passage_tokens,
                   options.lookup_trials)

    def check(self, n_layers: int, options: FitOptions) -> None:
        """A clear error when these measurements were taken on another model or under other settings."""
        for g, costs in self.removal_costs.items():
            if len(costs) != n_layers:
                raise ValueError(f"the measurements hold {len(costs)} layer costs, the model has {n_layers} layers "
                                 f"(granularity {g})")
        for name in ("routing_sink_tokens", "label_samples", "lookup_passage_tokens", "lookup_trials"):
            if getattr(self, name) != getattr(options, name):
                raise ValueError(f"the measurements were taken with {name}={getattr(self, name)}, the fit asks for "
                                 f"{getattr(options, name)}")

    def with_costs(self, model: MoDForCausalLM, batches: Sequence[dict], granularities: Sequence[str],
                   progress: bool = True) -> LayerMeasurements:
        """These measurements plus the removal costs of the `granularities` not measured yet."""
        missing = [g for g in granularities if g not in self.removal_costs]
        costs = {g: layer_removal_costs(model, batches, g, progress) for g in missing}
        return replace(self, removal_costs={**self.removal_costs, **costs}) if costs else self

    def with_lookup(self, model: MoDForCausalLM, lookup: LookupCheck, layers: Sequence[int],
                    granularities: Sequence[str], progress: bool = True) -> LayerMeasurements:
        """These measurements plus the dense model's look-up accuracy and that of each of `layers` skipped under each
        of `granularities`, where not measured yet."""
        dense = self.dense_lookup if self.dense_lookup is not None else lookup.accuracy(model)
        measured = {g: dict(self.lookup.get(g, {})) for g in set(self.lookup) | set(granularities)}
        for g in granularities:
            missing = [j for j in layers if j not in measured[g]]
            if missing:
                measured[g].update(layer_lookup_accuracy(model, lookup, missing, g, progress))
        return replace(self, dense_lookup=dense, lookup=measured)

    def with_scores(self, model: MoDForCausalLM, batches: Sequence[dict], layers: Sequence[int]) -> LayerMeasurements:
        """These measurements plus the Fisher scores of those `layers` not scored yet."""
        missing = [j for j in layers if j not in self.scores]
        if not missing:
            return self
        inputs, scores = fisher_scores(model, batches, missing, samples=self.label_samples)
        return replace(self, inputs={**self.inputs, **inputs}, scores={**self.scores, **scores})

    def breaks_lookup(self, layer: int, granularity: str, options: FitOptions) -> bool:
        """Whether skipping `granularity` of `layer` keeps less than `min_lookup_share` of the dense model's look-up
        (never, where the dense model does not look up: `LOOKUP_GUARD_MIN_ACCURACY`)."""
        return lookup_broken(self.lookup[granularity][layer], self.dense_lookup, options)


def lookup_broken(accuracy: float, dense: float, options: FitOptions) -> bool:
    """The look-up guard: `accuracy` below `min_lookup_share` of the dense model's `dense` accuracy."""
    return dense >= LOOKUP_GUARD_MIN_ACCURACY and accuracy < options.min_lookup_share * dense


def candidate_layers(measured: LayerMeasurements, options: FitOptions, n_layers: int) -> tuple[list[int], dict]:
    """The layers a fit may route, and why each other layer is not: with `routed_layers="auto"` every layer whose
    removal (the cheaper of the fit's granularities) costs at most `ruinous_factor` times the median layer's, else the
    layers `options` names."""
    if options.routed_layers != "auto":
        layers = [int(j) for j in options.routed_layers]
        bad = [j for j in layers if not 0 <= j < n_layers]
        if bad:
            raise ValueError(f"routed layers {bad} do not exist: the model has {n_layers} layers")
        return sorted(set(layers)), {j: "not named in routed_layers" for j in range(n_layers) if j not in layers}
    cost = [min(measured.removal_costs[g][j] for g in options.granularities()) for j in range(n_layers)]
    limit = options.ruinous_factor * max(sorted(cost)[n_layers // 2], 1e-6)
    ruinous = {j: f"ruinous: removal costs {cost[j]:.4f} nats, more than {limit:.4f}" for j in range(n_layers)
               if cost[j] > limit}
    return [j for j in range(n_layers) if j not in ruinous], ruinous


def routable_layers(
    measured: LayerMeasurements, options: FitOptions, layers: Sequence[int]
) -> tuple[list[int], dict[int, str], dict[int, str]]:
    """Of the candidate `layers`: those a fit may route, cheapest first, what each one's tokens skip (the granularity
    of the fit's whose removal costs least and keeps look-up), and why each other candidate may not be routed."""
    granularity, refused = {}, {}
    for j in layers:
        kept = [g for g in options.granularities() if not measured.breaks_lookup(j, g, options)]
        if kept:
            granularity[j] = min(kept, key=lambda g: measured.removal_costs[g][j])
        else:
            worst = ", ".join(f"{measured.lookup[g][j]:.2f} ({g})" for g in options.granularities())
            refused[j] = f"breaks look-up: accuracy {worst}, dense {measured.dense_lookup:.2f}"
    ranked = sorted(granularity, key=lambda j: measured.removal_costs[granularity[j]][j])
    return ranked, granularity, refused


def measure_layers(
    model: MoDForCausalLM, batches: Sequence[dict], options: FitOptions, progress: bool = True
) -> LayerMeasurements:
    """Every measurement a fit of `model` with `options` takes on `batches` (for fits to several budgets): removal
    costs, look-up of the candidate layers, and the Fisher scores of every layer."""
    batches = list(batches)
    dense = measuring_model(model, options.routing_sink_tokens)
    n_layers = model.config.num_hidden_layers
    measured = LayerMeasurements.taken_with(options).with_costs(dense, batches, options.granularities(), progress)
    layers, _ = candidate_layers(measured, options, n_layers)
    lookup = LookupCheck.from_batches(batches, options, model.config.max_position_embeddings)
    measured = measured.with_lookup(dense, lookup, layers, options.granularities(), progress)
    return measured.with_scores(dense, batches, range(n_layers))


def fitted_router_weights(
    model: MoDForCausalLM, granularity: dict[int, str], measured: LayerMeasurements, batches: Sequence[dict],
    options: FitOptions,
) -> dict[int, torch.Tensor]:
    """Per layer of `granularity` (layer -> what its tokens skip): the router weight regressed on the Fisher scores of
    skipping that (`regressed_router_weight`), from `measured` (taken on `batches`)."""
    keep = decided_tokens(model, batches)
    router = next(layer.router for layer in model.model.layers if layer.has_router)
    return {j: regressed_router_weight(router, measured.inputs[j], measured.scores[j][g], keep, options.ridge,
                                       options.logit_scale) for j, g in granularity.items()}


# --------------------------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------------------------


def _plan_tokens(ranked: list[int], skipped: float, max_skip: float, fitted: set[int]) -> dict[int, float]:
    """Token routing only: the cheapest fitted layers each skip `max_skip` of their tokens, the last one what is left
    of `skipped` (layers' worth of skipped tokens)."""
    plan, left = {}, skipped
    for j in ranked:
        if left <= 1e-9:
            break
        if j in fitted:
            plan[j] = min(max_skip, left)
            left -= plan[j]
    return plan


def _plan_layers(ranked: list[int], skipped: float, max_skip: float, fitted: set[int]) -> dict[int, float]:
    """Whole layers: the cheapest layers are skipped by every token but the sinks; a fractional rest is routed."""
    plan, left = {}, skipped
    for j in ranked:
        if left <= 1e-9:
            break
        if left >= 1.0 - 1e-9 or j in fitted:
            plan[j] = min(1.0, left)
            left -= plan[j]
    return plan


def _plan_mixed(ranked: list[int], skipped: float, max_skip: float, fitted: set[int]) -> dict[int, float]:
    """Half the budget (in whole layers) from skipping the cheapest layers, the rest from token routing in the next."""
    whole = math.floor(skipped / 2)
    plan = {j: 1.0 for j in ranked[:whole]}
    plan.update(_plan_tokens([j for j in ranked if j not in plan], skipped - whole, max_skip, fitted))
    return plan


PLANS = {"tokens": _plan_tokens, "layers": _plan_layers, "mixed": _plan_mixed}


def plan_at_budget(
    build: Callable[[float], dict[int, float]], budget: Budget, config: MoDConfig, granularity: dict[int, str],
) -> RoutingPlan | None:
    """The plan `build(skipped)` (layer -> share of its tokens skipped, for `skipped` layers' worth of skipped tokens)
    at `budget`, as a `RoutingPlan` whose layers skip what `granularity` says; None where `build` cannot reach it.
    A KV budget is `skipped = (1 - kv_fraction) * layers`; a FLOP budget is found by bisection (FLOPs fall as more is
    skipped)."""
    n_layers = config.num_hidden_layers

    def plan_for(skipped: float) -> RoutingPlan:
        skips = build(skipped)
        layers = sorted(skips)
        return RoutingPlan(n_layers, layers, [max(0.0, 1.0 - skips[j]) for j in layers],
                           [granularity[j] for j in layers])

    if budget.kv_fraction is not None:
        plan = plan_for((1.0 - budget.kv_fraction) * n_layers)
    else:
        low, high = 0.0, float(n_layers)
        if budget.of(plan_for(high), config) > budget.target + 1e-9:
            return None
        for _ in range(40):
            mid = (low + high) / 2
            low, high = (mid, high) if budget.of(plan_for(mid), config) > budget.target else (low, mid)
        plan = plan_for(high)
    return plan if budget.of(plan, config) <= budget.target + 1e-6 else None


def model_for_plan(
    model: MoDForCausalLM, plan: RoutingPlan, weights: dict[int, torch.Tensor], options: FitOptions,
    batches: Sequence[dict],
) -> MoDForCausalLM:
    """A model routing as `plan` with the router `weights` (layer -> weight), its thresholds calibrated layer by layer
    to the plan on `batches`; a layer the plan skips whole (but its sinks) gets the router that always skips (weight 0,
    bias `-THRESHOLD_LOGIT_LIMIT` at p = 0.5: the saved form of `override="skip"`)."""
    new = with_plan(model, plan, routing_sink_tokens=options.routing_sink_tokens)
    whole = [j for j, share in zip(plan.routed_layers, plan.routed_share) if share <= 0.0]
    with torch.no_grad():
        for j in plan.routed_layers:
            router = new.model.layers[j].router
            router.weight.copy_(torch.zeros_like(router.weight) if j in whole else weights[j])
            router.bias.zero_()
    calibrate_thresholds(new, batches, plan=plan, progress=False)
    # after calibration: while a layer is calibrated, every later layer routes every token, this one included
    thresholds = list(new.config.router_threshold)
    with torch.no_grad():
        for j in whole:
            new.model.layers[j].router.bias.fill_(-THRESHOLD_LOGIT_LIMIT)
            thresholds[plan.routed_layers.index(j)] = 0.5
    new.config.router_threshold = thresholds
    return new


# --------------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------------


def fit_routers(
    model: MoDForCausalLM, batches: Sequence[dict], options: FitOptions, progress: bool = True,
    measured: LayerMeasurements | None = None,
) -> tuple[MoDForCausalLM, FitRecord]:
    """Route `model` to the budget of `options` (a `FitOptions`, or the step's `FitSettings`) from measurements on
    `batches` (see the module docstring).

    `measured`: measurements of `measure_layers` on the same model, batches and options, when several fits share them
    (a sweep over budgets); the fit then measures only what they lack, and its result is the one it reaches measuring
    everything itself. Returns a model (a new one: its routed layers change) with fitted routers, calibrated
    thresholds and the chosen plan in `config.routing_plan`, and the record of what was measured.
    """
    start = time.perf_counter()
    if model.config.router_kind != "threshold":
        raise ValueError("fitting sets threshold routers: router_kind must be 'threshold', not "
                         f"{model.config.router_kind!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("fitting routers needs at least one batch of calibration text")
    budget, config, n_layers = options.budget(), model.config, model.config.num_hidden_layers
    dense = measuring_model(model, options.routing_sink_tokens)
    lookup = LookupCheck.from_batches(batches, options, config.max_position_embeddings)
    measured = measured or LayerMeasurements.taken_with(options)
    measured.check(n_layers, options)
    measured = measured.with_costs(dense, batches, options.granularities(), progress)
    layers, refused = candidate_layers(measured, options, n_layers)
    measured = measured.with_lookup(dense, lookup, layers, options.granularities(), progress)
    ranked, granularity, broken = routable_layers(measured, options, layers)
    refused.update(broken)
    record = FitRecord(
        settings=fit_settings_record(options), budget=budget.record(),
        removal_cost={g: [round(c, 5) for c in costs] for g, costs in measured.removal_costs.items()},
        lookup_accuracy={"dense": round(measured.dense_lookup, 4), **{
            g: [None if j not in acc else round(acc[j], 4) for j in range(n_layers)]
            for g, acc in measured.lookup.items() if g in options.granularities()}},
        layer_granularity={str(j): granularity[j] for j in sorted(granularity)},
        refused_layers={str(j): refused[j] for j in sorted(refused)}, routed_layers=[], plan={}, plan_fractions={},
        calibration_tokens=sum(int(b["input_ids"].numel()) for b in batches))

    # How much the token-routing plan skips at this budget (with every routable layer fitted) says how many routers to
    # fit: those of the cheapest layers, enough to hold it at max_skip, and a margin.
    everything = plan_at_budget(lambda s: _plan_tokens(ranked, s, options.max_skip, set(ranked)), budget, config,
                                granularity)
    if everything is None:
        raise ValueError(f"{budget} is out of reach of {len(ranked)} routable layers at max_skip={options.max_skip}; "
                         f"raise the budget or max_skip (layers not routable: {refused})")
    skipped = len(everything.routed_layers) - sum(everything.routed_share)  # layers' worth of skipped tokens
    if skipped <= 1e-9:
        new = with_plan(dense, RoutingPlan(n_layers, [], [], []), routing_sink_tokens=options.routing_sink_tokens)
        return _finish(new, record, "dense", start)
    needed = math.ceil(skipped / options.max_skip - 1e-9)
    fitted = sorted(ranked[: min(len(ranked), 2 * needed)])
    measured = measured.with_scores(dense, batches, fitted)
    weights = fitted_router_weights(dense, {j: granularity[j] for j in fitted}, measured, batches, options)

    # Candidate plans, each calibrated and measured whole on the calibration text (loss and look-up), because costs do
    # not add up: skipping tokens in several layers compounds, deleting layers less so.
    plans = {name: plan_at_budget(lambda s, build=build: build(ranked, s, options.max_skip, set(fitted)), budget,
                                  config, granularity) for name, build in PLANS.items()}
    base_loss, base_lookup = mean_loss(dense, batches), lookup.accuracy(dense)
    best, seen = None, {}
    for name, plan in tqdm(plans.items(), desc="measuring plans", disable=not progress):
        if plan is None:
            record.plans[name] = {"unreachable": True}
            continue
        if plan in seen:  # the same plan as another one: the same model
            record.plans[name] = {**record.plans[seen[plan]], "same_as": seen[plan]}
            continue
        seen[plan] = name
        candidate = model_for_plan(dense, plan, weights, options, batches)
        loss, accuracy = mean_loss(candidate, batches), lookup.accuracy(candidate)
        refused_plan = lookup_broken(accuracy, base_lookup, options)
        record.plans[name] = {"loss_increase": round(loss - base_loss, 5), "lookup_accuracy": round(accuracy, 4),
                              "dense_lookup_accuracy": round(base_lookup, 4), "refused": refused_plan,
                              **plan_fractions(plan, config)}
        if not refused_plan and (best is None or loss < best[0]):
            best = (loss, name, candidate, plan)
    if best is None:
        raise LookupBroken(
            f"every plan at {budget} breaks look-up (accuracy on a repeated passage below min_lookup_share="
            f"{options.min_lookup_share} of the dense model's {base_lookup:.2f}: "
            + ", ".join(f"{n} {p['lookup_accuracy']:.2f} (loss +{p['loss_increase']:.3f} nats/token)"
                        for n, p in record.plans.items() if "lookup_accuracy" in p)
            + "); raise the budget, route another granularity, or lower min_lookup_share")
    _, chosen, new, plan = best
    record.routed_layers = list(plan.routed_layers)
    record.plan, record.plan_fractions = plan.to_dict(), plan_fractions(plan, config)
    return _finish(new, record, chosen, start)


def _finish(model: MoDForCausalLM, record: FitRecord, chosen: str, start: float) -> tuple[MoDForCausalLM, FitRecord]:
    record.chosen_plan = chosen
    record.seconds = round(time.perf_counter() - start, 1)
    model.config.calibration = {**(model.config.calibration or {}), "budget": record.budget, "fit": asdict(record)}
    return model, record


def fold_thresholds_into_biases(model: MoDForCausalLM) -> None:
    """Move each routed layer's threshold into its router bias (`logit >= threshold_logit` <=> `logit -
    threshold_logit >= 0`), so every threshold is the paper's p = 0.5 and the gates are centred on the decision
    boundary."""
    with torch.no_grad():
        for j in model.config.routed_layers:
            router = model.model.layers[j].router
            router.bias.sub_(router.threshold_logit)
    model.config.router_threshold = 0.5


def shortgpt_order(base: torch.nn.Module, calib: Sequence[dict]) -> tuple[list[int], list[float]]:
    """Layers by falling mean cosine similarity between their input and output hidden states on `calib`: the order in
    which ShortGPT removes them. Returns the order and the similarities."""
    sums = [0.0] * len(base.model.layers)

    def hook(j: int):
        def add(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            sums[j] += torch.cosine_similarity(hidden_in.float(), hidden_out.float(), dim=-1).sum().item()
        return add

    handles = [layer.register_forward_hook(hook(j), with_kwargs=True) for j, layer in enumerate(base.model.layers)]
    try:
        with torch.no_grad():
            for batch in calib:
                base(batch["input_ids"], use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    cosine = [s / sum(b["input_ids"].numel() for b in calib) for s in sums]
    return sorted(range(len(cosine)), key=lambda j: -cosine[j]), cosine


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


def fit_settings_record(options: FitOptions) -> dict:
    """The settings as the fit record stores them: what the fit does (the data sources are recorded apart, by name)."""
    return {k: v for k, v in options.recorded().items() if k not in data_fields()}


def fit_checkpoint(settings: FitSettings) -> dict:
    """Fit the routers of the MoD checkpoint `settings.model` to the budget of `settings` on `settings.data` and write
    the routed checkpoint to `settings.out`.

    Returns the calibration record (the fit record under `"fit"`, and what the plan gives measured on the held-out
    blocks under `"held_out"`)."""
    from transformers import AutoTokenizer

    from .atomic import atomic_output_dir
    from .budget import measured_plan
    from .calibrate import _collect
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
        calibration["held_out"] = plan_fractions(measured_plan(model.config, routed), model.config)
        calibration["held_out_tokens"] = int(sum(b["input_ids"].numel() for b in held))
    calibration["data"] = data_names(settings.data)
    model.config.calibration = calibration
    with atomic_output_dir(out, overwrite=settings.overwrite) as tmp:
        save_checkpoint(model, tmp, companions_from=folder)
        update_results(tmp / RESULTS_FILENAME, model.config, str(out), extra={"fit": asdict(record)})
    return calibration
