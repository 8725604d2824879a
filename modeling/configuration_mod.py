"""Configuration of MoDification (Mixture-of-Depths) decoder models.

This file is copied into every MoD checkpoint: it imports only transformers (and, through it, torch).
"""

import textwrap
from dataclasses import MISSING, asdict, dataclass, field, replace
from typing import Literal

# The `@strict` decorator of every transformers 5 config (huggingface_hub's), imported through transformers so that this
# file depends on transformers alone: fields are validated when set (construction, `update`, assignment) and the class
# validators (`validate_*`) run on construction and on `save_pretrained`.
from transformers.configuration_utils import PreTrainedConfig, strict

ROUTER_KINDS = ("threshold", "topk", "dense")
GATE_MODES = ("scale", "exact")
ROUTING_GRANULARITIES = ("block", "attention")
# Base architectures whose weights map one-to-one onto MoDForCausalLM.
SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_routed_layers(value: list[int] | None) -> None:
    for idx in value or []:
        if not _is_int(idx) or idx < 0:
            raise ValueError(f"routed_layers holds {idx!r}, but layer indices must be integers >= 0")
    if value is not None and list(value) != sorted(set(value)):
        raise ValueError(f"routed_layers must be sorted and without repeats, got {value}")


def _check_threshold(value: float | list[float]) -> None:
    for p in value if isinstance(value, list) else [value]:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            raise ValueError(f"router_threshold must lie in the open interval (0, 1), got {p!r}")


def _check_granularity(value: str | list[str]) -> None:
    if any(g not in ROUTING_GRANULARITIES for g in (value if isinstance(value, list) else [value])):
        raise ValueError(f"routing_granularity must be 'block' or 'attention', or a list of them, got {value!r}")


def _check_capacity(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"topk_capacity must lie in (0, 1], got {value}")


def _check_non_negative(value: float) -> None:
    if value < 0.0:
        raise ValueError(f"a loss coefficient must be >= 0, got {value}")


def _check_target(value: float | list[float] | None) -> None:
    for t in value if isinstance(value, list) else [value]:
        if t is not None and not 0.0 <= t <= 1.0:
            raise ValueError("load_loss_target must lie in [0, 1] (one value or one per routed layer) or be None, "
                             f"got {t}")


def _check_sink_tokens(value: int) -> None:
    if not _is_int(value) or value < 0:
        raise ValueError(f"routing_sink_tokens must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class RoutingPlan:
    """A per-layer routing plan, stored in `MoDConfig.routing_plan` as `to_dict()`: for each routed layer the share of
    its (non-padding) tokens that run it, sinks included (`routed_share`: its `routed_fraction` once thresholds hit the
    plan), and what a skipped token leaves out (`granularity`); unrouted layers keep every token. `kv_fraction()` and
    `flop_fraction(config, T)` say what it saves, `scaled(...)` fits it to another budget. A bad value raises a
    `ValueError` naming `routing_plan.<field>`."""

    num_layers: int
    routed_layers: tuple[int, ...]
    routed_share: tuple[float, ...]
    granularity: tuple[str, ...]

    def __post_init__(self):
        for name in ("routed_layers", "routed_share", "granularity"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        n, layers, shares, kinds = self.num_layers, self.routed_layers, self.routed_share, self.granularity
        for name, expected, ok in (
            ("num_layers", "an integer >= 1", _is_int(n) and n >= 1),
            ("routed_layers", f"sorted indices in [0, {n - 1}] without repeats",
             all(_is_int(j) and 0 <= j < n for j in layers) and list(layers) == sorted(set(layers))),
            ("routed_share", "one value in [0, 1] per routed layer", len(shares) == len(layers) and all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0.0 <= r <= 1.0 for r in shares)),
            ("granularity", "'block' or 'attention' per routed layer", len(kinds) == len(layers)
             and all(g in ROUTING_GRANULARITIES for g in kinds)),
        ):
            if not ok:
                raise ValueError(f"routing_plan.{name} must be {expected}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:  # the plain form config.json stores (`MoDConfig.routing_plan`)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: "MoDConfig", routed_share: float | list[float] | None = None) -> "RoutingPlan":
        """`config.routing_plan`, or the config's routed layers and granularities with `routed_share` (one value, or
        one per routed layer: e.g. measured routed fractions)."""
        if routed_share is None:
            if not isinstance(config.routing_plan, dict) or set(config.routing_plan) != set(cls.__dataclass_fields__):
                raise ValueError(f"routing_plan must be a dict with keys {', '.join(cls.__dataclass_fields__)}, "
                                 f"got {config.routing_plan!r}")
            return cls(**config.routing_plan)
        layers = config.routed_layers
        shares = list(routed_share) if isinstance(routed_share, (list, tuple)) else [routed_share] * len(layers)
        return cls(config.num_hidden_layers, layers, shares,
                   [config.routed_layer_value("routing_granularity", j) for j in layers])

    def config_fields(self) -> dict:  # the config fields that route as this plan: MoDConfig(..., **these)
        return {"routed_layers": list(self.routed_layers), "routing_granularity": list(self.granularity),
                "routing_plan": self.to_dict()}

    def layer_shares(self) -> list[float]:
        """The share of tokens each of the `num_layers` layers keeps (1 for unrouted layers)."""
        shares = dict(zip(self.routed_layers, self.routed_share))
        return [float(shares.get(j, 1.0)) for j in range(self.num_layers)]

    def kv_fraction(self) -> float:
        """K/V entries written over the dense model's: the kept share averaged over all layers."""
        return sum(self.layer_shares()) / self.num_layers

    def flop_fraction(self, config: "MoDConfig", context_length: int) -> float:
        """Executed over dense FLOPs for a prefill of `context_length` tokens (see `MoDConfig.prefill_flops`)."""
        return config.prefill_flops(context_length, self)["total"] / config.prefill_flops(context_length)["total"]

    def scaled(self, kv_fraction: float | None = None, *, flop_fraction: float | None = None,
               config: "MoDConfig | None" = None, context_length: int | None = None) -> "RoutingPlan":
        """This plan at another budget, `kv_fraction` or `flop_fraction` (at `context_length`, for `config`): every
        routed layer's skipped share `1 - routed_share` times one factor, clamped to whole layers (a plan that skips
        nothing spreads the budget evenly)."""
        name, target = ("kv_fraction", kv_fraction) if flop_fraction is None else ("flop_fraction", flop_fraction)
        if (kv_fraction is None) == (flop_fraction is None) or (flop_fraction is not None and config is None):
            raise ValueError("give one budget: kv_fraction, or flop_fraction with config and context_length")
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {target!r}")
        skipped = [1.0 - r if min(self.routed_share) < 1 else 1.0 for r in self.routed_share]
        at = lambda c: replace(self, routed_share=[1.0 - min(1.0, c * s) for s in skipped])  # noqa: E731
        budget = lambda plan: plan.kv_fraction() if flop_fraction is None else plan.flop_fraction(  # noqa: E731
            config, context_length)
        low, high = 0.0, 1.0 / min([s for s in skipped if s > 0], default=1.0)
        if target < budget(at(high)) - 1e-12:
            raise ValueError(f"{name}={target} is out of reach: this plan gives {budget(at(high)):.4f} with each of "
                             f"its layers {list(self.routed_layers)} skipped whole; route more layers")
        for _ in range(100):  # the budget falls monotonically as the factor grows
            mid = (low + high) / 2
            low, high = (mid, high) if budget(at(mid)) > target else (low, mid)
        return at(high)


def routing_field(default, help: str, *validators):
    """A routing field: its validators run whenever it is set (as huggingface_hub's `validated_field`), and its `help`
    is the one description every other surface derives from (the `modification convert` flags, the release manifest,
    the results and model card, this class's docstring)."""
    metadata = {"validator": list(validators), "help": help, "routing": True}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@strict
class MoDConfig(PreTrainedConfig):
    r"""
    Configuration of a Mixture-of-Depths decoder converted from a Llama-family model (Llama, Mistral, Qwen2, Qwen3).

    The architecture fields are those of [`LlamaConfig`] plus `attention_out_bias` (Qwen2 has biases on q/k/v but
    not on o) and `qk_norm` (Qwen3's per-head RMSNorm on queries and keys). Like every transformers 5 config it is a
    strict dataclass: a bad value raises (`StrictDataclassFieldValidationError`, naming the field) when it is set, and
    the checks across fields (`validate_routing`) run on construction and on `save_pretrained`.

    The routing fields (`ROUTING_FIELDS`) are declared once, below, with their help text; the `Routing fields`
    section of this docstring, the `modification convert` flags, the release manifest keys and the results/model-card
    routing section are all derived from those declarations.

    Args:
        output_router_logits (`bool`, defaults to `False`):
            As in Mixtral: also return the raw router logits (one `[batch, seq]` tensor per routed layer), the raw
            (unweighted) auxiliary loss `aux_loss` and the per-layer `routed_fraction`. The loss returned with labels
            always includes `router_aux_loss_coef * aux_loss`: the routing objective is what trains the routers.
        qk_norm (`bool`, defaults to `False`): Qwen3's per-head RMSNorm on queries and keys.
        attention_out_bias (`bool`, *optional*): bias on `o_proj`; `None` means the same as `attention_bias`.
        base_model_type (`str`, *optional*): the `model_type` of the model this one was converted from.
        base_model_name_or_path (`str`, *optional*): the Hub id (or the name given) of the model it was converted
            from; never an absolute local path in a published checkpoint.
        base_model_license (`dict`, *optional*): the licence fields of the base model's card, read by `convert` from a
            local base folder (the folder itself is not named in a published checkpoint).
        calibration (`dict`, *optional*): what threshold calibration and router fitting measured.
        routing_plan (`dict`, *optional*): the per-layer plan a fit chose ([`RoutingPlan`]`.to_dict()`: routed
            share and granularity per routed layer); it must name `routed_layers` and their `routing_granularity`.

    `router_aux_loss_coef` (the Mixtral name) reads and sets the coefficient of the current router kind's auxiliary
    loss (`load_loss_coef` or `topk_aux_loss_coef`). MoD models cannot return attention weights: a config takes
    `output_attentions=True`, as every config does, and the model's forward refuses it.
    """

    model_type = "modification"
    # Everything a forward can return besides the logits: Trainer.evaluate/predict hand only the logits to
    # compute_metrics.
    keys_to_ignore_at_inference = [
        "cache", "router_logits", "aux_loss", "lm_loss", "routed_fraction", "router_decisions",
    ]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    # Llama-family architecture
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_out_bias: bool | None = None
    attention_dropout: float | int = 0.0
    mlp_bias: bool = False
    qk_norm: bool = False

    # Routing (ROUTING_FIELDS): each declaration is the one source of its flag, manifest key, results, card and docs.
    router_kind: Literal["threshold", "topk", "dense"] = routing_field(
        "threshold",
        "threshold: MoDification's causal threshold-p operator (a token runs a routed layer iff its gate "
        "g = sigmoid(router(x)) >= p); topk: original MoD (the ceil(topk_capacity * n) tokens of each sequence "
        "with the "
        "largest router logits run the layer in training and prefill, g >= p when decoding, the router trained by a "
        "BCE loss to predict top-k membership); dense: every token runs every layer (the base model; routers kept, "
        "frozen, so weights round-trip)",
    )
    routed_layers: list[int] | None = routing_field(
        None,
        "indices of the layers that have a router (default: every other layer from 1: 1, 3, 5, ...); the other "
        "layers run every token",
        _check_routed_layers,
    )
    router_threshold: float | list[float] = routing_field(
        0.5, "the threshold p in (0, 1): one value, or one per routed layer", _check_threshold
    )
    routing_granularity: Literal["block", "attention"] | list[str] = routing_field(
        "block",
        "what a token that a router skips leaves out: block (the whole layer, attention and MLP: its hidden state "
        "passes through unchanged) or attention (ours: the attention sub-layer only, so it writes no K/V, and it "
        "still runs the MLP; the gate then scales the attention output alone); one value, or one per routed layer",
        _check_granularity,
    )
    topk_capacity: float | int = routing_field(
        0.5, "fraction of each sequence's tokens that run a routed layer in topk mode, in (0, 1]", _check_capacity
    )
    gate_mode: Literal["scale", "exact"] = routing_field(
        "exact",
        "how a routed token's sub-layer outputs are weighted. exact (ours): the gate's forward value is 1 "
        "(g / g.detach()) while its gradient reaches the router, so a freshly converted model is exactly the base; "
        "scale (the paper): h + g * Attn(h) and a + g * MLP(a)",
    )
    router_init_bias: float | int = routing_field(
        2.0,
        "initial router bias (router weights start at zero): 2.0 gives every token g = sigmoid(2) = 0.88, so at "
        "p = 0.5 every token is routed at conversion and training starts from the base model",
    )
    load_loss_coef: float | int = routing_field(
        0.01,
        "alpha of the layer-load objective R = alpha * sum_j F_j * G_j over routed layers (F_j: fraction of tokens "
        "routed, no gradient; G_j: mean gate): the router_aux_loss_coef of threshold routing",
        _check_non_negative,
    )
    load_loss_target: float | int | list[float] | None = routing_field(
        None,
        "ours: a routed fraction per routed layer (one value, or one per routed layer) that the layer-load objective "
        "holds each layer at: F_j becomes F_j - target_j, so gates go down while a layer routes more than its target "
        "and up while it routes fewer (default: none, the paper's objective)",
        _check_target,
    )
    topk_aux_loss_coef: float | int = routing_field(
        0.01,
        "weight of the BCE loss that teaches the router logits to predict top-k membership: the "
        "router_aux_loss_coef of topk routing",
        _check_non_negative,
    )
    routing_sink_tokens: int = routing_field(
        0,
        "ours: the first N positions of every sequence run every routed layer whatever their router says "
        "(pretrained LLMs park attention on the first tokens, the attention sinks; `modification fit` sets 4)",
        _check_sink_tokens,
    )
    output_router_logits: bool = False

    # Provenance
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
    base_model_license: dict | None = None
    calibration: dict | None = None
    # The fit's per-layer plan (`RoutingPlan.to_dict()`), validated against routed_layers and routing_granularity.
    routing_plan: dict | None = None

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention_out_bias is None:
            self.attention_out_bias = self.attention_bias
        if self.routed_layers is None:
            self.routed_layers = list(range(1, self.num_hidden_layers, 2))
        super().__post_init__(**kwargs)

    def routed_layer_value(self, name: str, layer_idx: int):
        """Routed layer `layer_idx`'s value of a per-routed-layer field (`router_threshold`, `routing_granularity`,
        `load_loss_target`): the one value, or its own entry of the list."""
        value = getattr(self, name)
        return value[self.routed_layers.index(layer_idx)] if isinstance(value, list) else value

    def prefill_flops(self, context_length: int, plan: RoutingPlan | None = None) -> dict:
        """FLOPs of a prefill of `context_length` (T) tokens of one sequence, per part: `attention_projections`,
        `attention_scores` and `mlp` (one entry per layer), `lm_head`, and their `total`; dense, or as `plan` runs.

        A multiply-add counts 2. With hidden size h, head size d, n_q query and n_kv key/value heads, MLP size m,
        vocabulary V, per dense layer: q/k/v/o projections `2 T h d (2 n_q + 2 n_kv)`; attention scores and values
        `2 n_q d T (T + 1)` (query t sees t keys: T (T + 1) / 2 pairs, 2d per head for q.k and for p.v); MLP
        `6 T h m`; and once, the LM head on every token, `2 T h V`. A routed layer keeping a share r of the tokens
        runs r of its projections and r^2 of its attention work (routed tokens spread evenly: r T queries each see
        r of the earlier keys), and r of its MLP with "block" granularity, all of it with "attention". Norms, rotary,
        softmax, activations, embeddings and routers (2h per token and routed layer) are left out.
        """
        if not _is_int(context_length) or context_length < 1:
            raise ValueError(f"context_length must be an integer >= 1, got {context_length!r}")
        plan = plan or RoutingPlan(self.num_hidden_layers, [], [], [])
        if plan.num_layers != self.num_hidden_layers:
            raise ValueError(f"routing_plan.num_layers is {plan.num_layers}, the model has {self.num_hidden_layers}")
        T, h, d, n_q = context_length, self.hidden_size, self.head_dim, self.num_attention_heads
        attention_only = {j for j, g in zip(plan.routed_layers, plan.granularity) if g == "attention"}
        shares = plan.layer_shares()
        flops = {
            "attention_projections": [r * 2 * T * h * d * (2 * n_q + 2 * self.num_key_value_heads) for r in shares],
            "attention_scores": [r * r * 2 * n_q * d * T * (T + 1) for r in shares],
            "mlp": [(1.0 if j in attention_only else r) * 6 * T * h * self.intermediate_size
                    for j, r in enumerate(shares)],
        }
        lm_head = 2.0 * T * h * self.vocab_size
        return {**flops, "lm_head": lm_head, "total": sum(map(sum, flops.values())) + lm_head}

    @property
    def router_aux_loss_coef(self) -> float:
        """The coefficient of the auxiliary loss of the current router kind (Mixtral's name for it)."""
        return self.topk_aux_loss_coef if self.router_kind == "topk" else self.load_loss_coef

    @router_aux_loss_coef.setter
    def router_aux_loss_coef(self, value: float) -> None:
        if self.router_kind == "topk":
            self.topk_aux_loss_coef = value
        else:
            self.load_loss_coef = value

    @property
    def output_attentions(self) -> bool:
        return self._output_attentions

    @output_attentions.setter
    def output_attentions(self, value: bool) -> None:
        # transformers' setter switches to (or insists on) `eager`, which forms no attention weights here either.
        self._output_attentions = value

    def validate_output_attentions(self) -> None:
        """Part of `@strict` validation: any value is valid here; the forward refuses `True` (see `MoDModel`)."""

    def validate_routing(self) -> None:
        """Part of `@strict` validation: every routing field, and the checks that need several fields."""
        for name, f in self.__dataclass_fields__.items():  # each routing field's own validators first
            for validator in f.metadata.get("validator", []) if f.metadata.get("routing") else []:
                validator(getattr(self, name))
        if self.routed_layers and self.routed_layers[-1] >= self.num_hidden_layers:
            raise ValueError(f"routed_layers holds {self.routed_layers[-1]}, but layer indices must lie in [0, "
                             f"{self.num_hidden_layers - 1}] (the model has "
                             f"num_hidden_layers={self.num_hidden_layers})")
        for name in ("router_threshold", "routing_granularity", "load_loss_target"):  # one value per routed layer
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != len(self.routed_layers):
                raise ValueError(
                    f"{name} is a list of {len(value)} values but there are {len(self.routed_layers)} routed_layers; "
                    "give one value per routed layer or a single value"
                )
        if self.routing_plan is not None:
            plan, ours = RoutingPlan.from_config(self), RoutingPlan.from_config(self, 1.0)
            if (plan.num_layers, plan.routed_layers, plan.granularity) != (
                    ours.num_layers, ours.routed_layers, ours.granularity):
                raise ValueError(f"routing_plan {self.routing_plan} disagrees with num_hidden_layers, routed_layers or "
                                 "routing_granularity; set them together: MoDConfig(..., **plan.config_fields())")


# The routing fields, in declaration order: what `modification convert` sets and what results and cards report.
ROUTING_FIELDS = tuple(name for name, f in MoDConfig.__dataclass_fields__.items() if f.metadata.get("routing"))


def _routing_fields_doc() -> str:
    lines = ["", "    Routing fields:"]
    for name in ROUTING_FIELDS:
        f = MoDConfig.__dataclass_fields__[name]
        default = f.default if f.default_factory is MISSING else f.default_factory()
        lines.append(f"        {name} (defaults to `{default!r}`):")
        lines += ["            " + line for line in textwrap.wrap(f.metadata["help"], 104)]
    return "\n".join(lines) + "\n"


MoDConfig.__doc__ += _routing_fields_doc()

__all__ = ["MoDConfig", "ROUTING_FIELDS", "RoutingPlan"]
