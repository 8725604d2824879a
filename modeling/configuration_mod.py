"""Configuration of MoDification (Mixture-of-Depths) decoder models.

This file is copied into every MoD checkpoint: it imports only transformers (and, through it, torch).
"""

import textwrap
from dataclasses import MISSING, field
from typing import Literal

# The `@strict` decorator of every transformers 5 config (huggingface_hub's), imported through transformers so that this
# file depends on transformers alone: fields are validated when set (construction, `update`, assignment) and the class
# validators (`validate_*`) run on construction and on `save_pretrained`.
from transformers.configuration_utils import PreTrainedConfig, strict


ROUTER_KINDS = ("threshold", "topk", "dense")
GATE_MODES = ("scale", "exact")
# Base architectures whose weights map one-to-one onto MoDForCausalLM.
SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _check_routed_layers(value: list[int] | None) -> None:
    if value is None:
        return
    for idx in value:
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError(f"routed_layers holds {idx!r}, but layer indices must be integers >= 0")
    if len(set(value)) != len(value) or list(value) != sorted(value):
        raise ValueError(f"routed_layers must be sorted and without repeats, got {value}")


def _check_threshold(value: float | list[float]) -> None:
    for p in value if isinstance(value, list) else [value]:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p < 1.0:
            raise ValueError(f"router_threshold must lie in the open interval (0, 1), got {p!r}")


def _check_capacity(value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"topk_capacity must lie in (0, 1], got {value}")


def _check_non_negative(value: float) -> None:
    if value < 0.0:
        raise ValueError(f"a loss coefficient must be >= 0, got {value}")


def _check_target(value: float | list[float] | None) -> None:
    for t in value if isinstance(value, list) else [value]:
        if t is not None and not 0.0 <= t <= 1.0:
            raise ValueError(f"load_loss_target must lie in [0, 1] (one value or one per routed layer) or be None, got {t}")


def _check_sink_tokens(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"routing_sink_tokens must be an integer >= 0, got {value!r}")


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

    `router_aux_loss_coef` (the Mixtral name) reads and sets the coefficient of the current router kind's auxiliary
    loss (`load_loss_coef` or `topk_aux_loss_coef`). MoD models cannot return attention weights: a config takes
    `output_attentions=True`, as every config does, and the model's forward refuses it.
    """

    model_type = "modification"
    # Everything a forward can return besides the logits: Trainer.evaluate/predict hand only the logits to
    # compute_metrics.
    keys_to_ignore_at_inference = ["cache", "router_logits", "aux_loss", "lm_loss", "routed_fraction", "router_decisions"]
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

    # Routing (ROUTING_FIELDS): each declaration is the single source of its flag, manifest key, results/card entry
    # and documentation.
    router_kind: Literal["threshold", "topk", "dense"] = routing_field(
        "threshold",
        "threshold: MoDification's causal threshold-p operator (a token runs a routed layer iff its gate "
        "g = sigmoid(router(x)) >= p); topk: original MoD (the ceil(topk_capacity * n) tokens of each sequence with the "
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
        _check_routed_layers(self.routed_layers)
        for idx in self.routed_layers:
            if idx >= self.num_hidden_layers:
                raise ValueError(
                    f"routed_layers holds {idx}, but layer indices must lie in [0, {self.num_hidden_layers - 1}]"
                    f" (the model has num_hidden_layers={self.num_hidden_layers})"
                )
        _check_threshold(self.router_threshold)
        if isinstance(self.router_threshold, list) and len(self.router_threshold) != len(self.routed_layers):
            raise ValueError(
                f"router_threshold is a list of {len(self.router_threshold)} values but there are "
                f"{len(self.routed_layers)} routed_layers; give one threshold per routed layer or a single float"
            )
        _check_capacity(self.topk_capacity)
        _check_non_negative(self.load_loss_coef)
        _check_non_negative(self.topk_aux_loss_coef)
        _check_target(self.load_loss_target)
        if isinstance(self.load_loss_target, list) and len(self.load_loss_target) != len(self.routed_layers):
            raise ValueError(
                f"load_loss_target is a list of {len(self.load_loss_target)} values but there are "
                f"{len(self.routed_layers)} routed_layers; give one target per routed layer or a single float"
            )
        _check_sink_tokens(self.routing_sink_tokens)


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

__all__ = ["MoDConfig", "ROUTING_FIELDS"]
