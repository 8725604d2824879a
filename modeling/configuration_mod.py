"""Configuration of MoDification (Mixture-of-Depths) decoder models.

This file is copied into every MoD checkpoint: it imports only transformers (and, through it, torch).
"""

from dataclasses import field
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


def _validated(default, *validators):
    """A config field whose validators run whenever it is set (as huggingface_hub's `validated_field`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"validator": list(validators)})
    return field(default=default, metadata={"validator": list(validators)})


@strict
class MoDConfig(PreTrainedConfig):
    r"""
    Configuration of a Mixture-of-Depths decoder converted from a Llama-family model (Llama, Mistral, Qwen2, Qwen3).

    The architecture fields are those of [`LlamaConfig`] plus `attention_out_bias` (Qwen2 has biases on q/k/v but
    not on o) and `qk_norm` (Qwen3's per-head RMSNorm on queries and keys). Like every transformers 5 config it is a
    strict dataclass: a bad value raises (`StrictDataclassFieldValidationError`, naming the field) when it is set, and
    the checks across fields (`validate_routing`) run on construction and on `save_pretrained`. The routing fields are:

    Args:
        router_kind (`str`, defaults to `"threshold"`):
            `"threshold"`: MoDification's causal threshold-p operator: a token runs a routed layer iff its gate
            `g = sigmoid(router(x))` satisfies `g >= p`. `"topk"`: original MoD (expert choice): during training and
            prefill the `ceil(topk_capacity * n)` tokens of each sequence with the largest router logits run the
            layer; once a cache holds earlier tokens (decoding), a token runs iff `g >= p`, the MoD paper's causal
            rule, with the router trained by an auxiliary BCE loss to predict top-k membership. `"dense"`: every
            token runs every layer with gate 1 (the base model); the routers are kept, frozen, so weights round-trip.
        routed_layers (`list[int]`, *optional*):
            Indices of the layers that have a router. Defaults to every other layer starting at layer 1
            (1, 3, 5, ...). The other layers run every token.
        router_threshold (`float` or `list[float]`, defaults to 0.5):
            The threshold p, global or one per routed layer, in the open interval (0, 1).
        topk_capacity (`float`, defaults to 0.5):
            Fraction of each sequence's tokens that run a routed layer in `"topk"` mode, in (0, 1].
        gate_mode (`str`, defaults to `"exact"`):
            How a routed token's sub-layer outputs are weighted. `"scale"` (the paper): `h + g * Attn(...)` and
            `a + g * MLP(...)`. `"exact"` (ours): the forward value of the gate is exactly 1 (`g / g.detach()`) while
            its gradient still reaches the router, so a freshly converted model whose routers route every token is
            exactly the base model.
        router_init_bias (`float`, defaults to 2.0):
            Initial router bias (the router weight starts at zero). 2.0 gives every token `g = sigmoid(2) = 0.88`, so
            with p = 0.5 every token is routed at conversion and training starts from the base model.
        load_loss_coef (`float`, defaults to 0.01):
            alpha of the layer-load objective `R = alpha * sum_j F_j * G_j` over routed layers (F_j: fraction of tokens
            routed, no gradient; G_j: mean gate, with gradient): the `router_aux_loss_coef` of `"threshold"` routing.
        load_loss_target (`float`, *optional*):
            Our option (one value, or one per routed layer): replace F_j by `F_j - target_j` so the objective pushes gates down while a layer routes more than
            `target` of its tokens and up while it routes fewer; the routed fraction settles near the target instead
            of collapsing to all-dense or all-skipped.
        routing_sink_tokens (`int`, defaults to 0):
            Ours: the first `routing_sink_tokens` positions of every sequence (position ids below it) run every routed
            layer whatever their router says. Pretrained LLMs park attention on the first tokens ("attention sinks");
            a sink missing from a layer's K/V derails every later token there, so routers must never skip them.
            `modification fit` sets 4.
        topk_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the BCE loss that teaches the router logits to predict top-k membership: the
            `router_aux_loss_coef` of `"topk"` routing.
        output_router_logits (`bool`, defaults to `False`):
            As in Mixtral: also return the raw router logits (one `[batch, seq]` tensor per routed layer), the raw
            (unweighted) auxiliary loss `aux_loss` and the per-layer `routed_fraction`. The loss returned with labels
            always includes `router_aux_loss_coef * aux_loss`: the routing objective is what trains the routers.
        qk_norm (`bool`, defaults to `False`): Qwen3's per-head RMSNorm on queries and keys.
        attention_out_bias (`bool`, *optional*): bias on `o_proj`; `None` means the same as `attention_bias`.
        base_model_type (`str`, *optional*): the `model_type` of the model this one was converted from.
        base_model_name_or_path (`str`, *optional*): the Hub id or folder it was converted from.
        calibration (`dict`, *optional*): what threshold calibration measured (written by `modification calibrate`).

    `router_aux_loss_coef` (the Mixtral name) reads and sets the coefficient of the current router kind's auxiliary
    loss (`load_loss_coef` or `topk_aux_loss_coef`). MoD models cannot return attention weights, so
    `output_attentions=True` is refused.
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

    # Routing
    router_kind: Literal["threshold", "topk", "dense"] = "threshold"
    routed_layers: list[int] | None = _validated(None, _check_routed_layers)
    router_threshold: float | list[float] = _validated(0.5, _check_threshold)
    topk_capacity: float | int = _validated(0.5, _check_capacity)
    gate_mode: Literal["scale", "exact"] = "exact"
    router_init_bias: float | int = 2.0
    load_loss_coef: float | int = _validated(0.01, _check_non_negative)
    load_loss_target: float | int | list[float] | None = _validated(None, _check_target)
    topk_aux_loss_coef: float | int = _validated(0.01, _check_non_negative)
    routing_sink_tokens: int = _validated(0, _check_sink_tokens)
    output_router_logits: bool = False

    # Provenance
    base_model_type: str | None = None
    base_model_name_or_path: str | None = None
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
        if value:
            raise ValueError(_NO_ATTENTION_WEIGHTS)
        self._output_attentions = value

    def validate_output_attentions(self) -> None:
        """Part of `@strict` validation: MoD attention kernels never form attention weights."""
        if self.output_attentions:
            raise ValueError(_NO_ATTENTION_WEIGHTS)

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


_NO_ATTENTION_WEIGHTS = (
    "MoD models run packed variable-length attention over routed tokens and cannot return attention weights "
    "(output_attentions=True)"
)


__all__ = ["MoDConfig"]
