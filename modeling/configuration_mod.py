"""Configuration of MoDification (Mixture-of-Depths) decoder models.

This file is copied into every MoD checkpoint: it imports only transformers (and, through it, torch).
"""

from transformers.configuration_utils import PreTrainedConfig


ROUTER_KINDS = ("threshold", "topk", "dense")
GATE_MODES = ("scale", "exact")
# Base architectures whose weights map one-to-one onto MoDForCausalLM.
SUPPORTED_BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class MoDConfig(PreTrainedConfig):
    r"""
    Configuration of a Mixture-of-Depths decoder converted from a Llama-family model (Llama, Mistral, Qwen2, Qwen3).

    The architecture fields are those of [`LlamaConfig`] plus `attention_out_bias` (Qwen2 has biases on q/k/v but
    not on o) and `qk_norm` (Qwen3's per-head RMSNorm on queries and keys). The routing fields are:

    Args:
        router_kind (`str`, defaults to `"threshold"`):
            `"threshold"`: MoDification's causal threshold-p operator: a token runs a routed layer iff its gate
            `g = sigmoid(router(x))` satisfies `g >= p`. `"topk"`: original MoD (expert choice): during training and
            prefill the `ceil(topk_capacity * n)` tokens of each sequence with the largest router logits run the
            layer; once a cache holds earlier tokens (decoding), a token runs iff `g >= p`, the MoD paper's causal
            rule, with the router trained by an auxiliary BCE loss to predict top-k membership. `"dense"`: every
            token runs every layer with gate 1 (the base model).
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
            routed, no gradient; G_j: mean gate, with gradient). Added to the LM loss when labels are given.
        load_loss_target (`float`, *optional*):
            Our option: replace F_j by `F_j - target` so the objective pushes gates down while a layer routes more than
            `target` of its tokens and up while it routes fewer; the routed fraction settles near the target instead
            of collapsing to all-dense or all-skipped.
        topk_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the BCE loss that teaches the router logits to predict top-k membership (`"topk"` mode).
        qk_norm (`bool`, defaults to `False`): Qwen3's per-head RMSNorm on queries and keys.
        attention_out_bias (`bool`, *optional*): bias on `o_proj`; `None` means the same as `attention_bias`.
        base_model_type (`str`, *optional*): the `model_type` of the model this one was converted from.
        base_model_name_or_path (`str`, *optional*): the Hub id or folder it was converted from.
        calibration (`dict`, *optional*): what threshold calibration measured (written by `modification calibrate`).
    """

    model_type = "modification"
    keys_to_ignore_at_inference = ["cache"]
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
    router_kind: str = "threshold"
    routed_layers: list[int] | None = None
    router_threshold: float | list[float] = 0.5
    topk_capacity: float = 0.5
    gate_mode: str = "exact"
    router_init_bias: float = 2.0
    load_loss_coef: float = 0.01
    load_loss_target: float | None = None
    topk_aux_loss_coef: float = 0.01

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
        self.validate_routing()

    def validate_routing(self) -> None:
        """Raise a `ValueError` naming the first routing field that holds a bad value."""
        if self.router_kind not in ROUTER_KINDS:
            raise ValueError(f"router_kind must be one of {ROUTER_KINDS}, got {self.router_kind!r}")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {self.gate_mode!r}")
        layers = list(self.routed_layers)
        for idx in layers:
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < self.num_hidden_layers:
                raise ValueError(
                    f"routed_layers holds {idx!r}, but layer indices must be integers in [0, {self.num_hidden_layers - 1}]"
                    f" (the model has num_hidden_layers={self.num_hidden_layers})"
                )
        if len(set(layers)) != len(layers) or layers != sorted(layers):
            raise ValueError(f"routed_layers must be sorted and without repeats, got {layers}")
        self.routed_layers = layers
        thresholds = self.router_threshold
        if isinstance(thresholds, (list, tuple)):
            if len(thresholds) != len(layers):
                raise ValueError(
                    f"router_threshold is a list of {len(thresholds)} values but there are {len(layers)} routed_layers; "
                    "give one threshold per routed layer or a single float"
                )
            self.router_threshold = [float(p) for p in thresholds]
            values = self.router_threshold
        else:
            self.router_threshold = float(thresholds)
            values = [self.router_threshold]
        for p in values:
            if not 0.0 < p < 1.0:
                raise ValueError(f"router_threshold must lie in the open interval (0, 1), got {p}")
        if not 0.0 < float(self.topk_capacity) <= 1.0:
            raise ValueError(f"topk_capacity must lie in (0, 1], got {self.topk_capacity}")
        if float(self.load_loss_coef) < 0.0:
            raise ValueError(f"load_loss_coef must be >= 0, got {self.load_loss_coef}")
        if float(self.topk_aux_loss_coef) < 0.0:
            raise ValueError(f"topk_aux_loss_coef must be >= 0, got {self.topk_aux_loss_coef}")
        if self.load_loss_target is not None and not 0.0 <= float(self.load_loss_target) <= 1.0:
            raise ValueError(f"load_loss_target must lie in [0, 1] or be None, got {self.load_loss_target}")

    def threshold_for_layer(self, layer_idx: int) -> float:
        """The threshold p of routed layer `layer_idx` (a model layer index)."""
        if isinstance(self.router_threshold, list):
            return self.router_threshold[self.routed_layers.index(layer_idx)]
        return self.router_threshold


__all__ = ["MoDConfig"]
