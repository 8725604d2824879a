"""MoDification: Mixture-of-Depths decoders converted from Llama-family models.

Each routed layer has a router that scores every token; a token either runs the whole layer (attention and MLP) or
skips it, its hidden state passing through unchanged. Only routed tokens are computed: they are gathered into a packed
`[tokens, hidden]` tensor, run through the layer with variable-length attention over the routed tokens of their own
sequence, and scattered back. A skipped token writes no key/value in that layer, so `MoDCache` holds, per layer and
per sequence, only the routed tokens: this is where the KV-memory saving comes from.

This file is copied into every MoD checkpoint: it imports only torch, transformers and its sibling configuration file.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput, logging

from .configuration_mod import MoDConfig


logger = logging.get_logger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Packed variable-length attention: one entry point, three backends
# --------------------------------------------------------------------------------------------------------------------


def _flash_attn_varlen_func() -> Callable | None:
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen_attn() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def select_attention_backend(device: torch.device, dtype: torch.dtype, attn_implementation: str | None) -> str:
    """Choose the kernel for packed causal attention over routed tokens.

    `"flash_attn"` (flash-attn's varlen kernel) when installed and on CUDA, else `"torch_varlen"` (PyTorch's own
    FlashAttention varlen API) when available on CUDA, else `"sdpa"`: an exact path that pads each sequence's routed
    tokens into a batch and calls `scaled_dot_product_attention` with a mask. `attn_implementation="eager"` forces the
    exact path everywhere (useful to check a GPU kernel against it).
    """
    if attn_implementation == "eager" or device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if _flash_attn_varlen_func() is not None:
        return "flash_attn"
    if _torch_varlen_attn() is not None:
        return "torch_varlen"
    return "sdpa"


def _sdpa_packed_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scaling):
    num_seqs = cu_seqlens_q.numel() - 1
    q_lens = cu_seqlens_q.diff()
    k_lens = cu_seqlens_k.diff()
    enable_gqa = query.shape[1] != key.shape[1]
    if num_seqs == 1:
        # One sequence: no padding needed. Queries are the last q_len of the k_len keys (bottom-right causal).
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))
        if max_seqlen_q == max_seqlen_k:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=enable_gqa)
        elif max_seqlen_q == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=enable_gqa)
        else:
            offset = max_seqlen_k - max_seqlen_q
            rows = torch.arange(max_seqlen_q, device=query.device)[:, None]
            cols = torch.arange(max_seqlen_k, device=query.device)[None, :]
            mask = cols <= rows + offset
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=enable_gqa)
        return out.squeeze(0).transpose(0, 1)

    # Several sequences: pad each one's tokens into [seqs, max_len, heads, dim] and mask.
    seq_q = torch.repeat_interleave(torch.arange(num_seqs, device=query.device), q_lens)
    pos_q = torch.arange(query.shape[0], device=query.device) - cu_seqlens_q[seq_q]
    seq_k = torch.repeat_interleave(torch.arange(num_seqs, device=query.device), k_lens)
    pos_k = torch.arange(key.shape[0], device=key.device) - cu_seqlens_k[seq_k]
    q = query.new_zeros(num_seqs, max_seqlen_q, *query.shape[1:])
    k = key.new_zeros(num_seqs, max_seqlen_k, *key.shape[1:])
    v = value.new_zeros(num_seqs, max_seqlen_k, *value.shape[1:])
    q[seq_q, pos_q] = query
    k[seq_k, pos_k] = key
    v[seq_k, pos_k] = value
    rows = torch.arange(max_seqlen_q, device=query.device)[None, :, None]
    cols = torch.arange(max_seqlen_k, device=query.device)[None, None, :]
    offset = (k_lens - q_lens)[:, None, None]
    mask = (cols < k_lens[:, None, None]) & (cols <= rows + offset)
    # Padding query rows would be fully masked (NaN in softmax); let them see everything, they are dropped below.
    mask = mask | (rows >= q_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None], scale=scaling,
        enable_gqa=enable_gqa,
    )
    return out.transpose(1, 2)[seq_q, pos_q]


def packed_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scaling: float,
    attn_implementation: str | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention over packed variable-length sequences.

    `query` is `[total_q, heads, dim]`, `key`/`value` are `[total_k, kv_heads, dim]`, sequence `i` owning rows
    `cu_seqlens_*[i]:cu_seqlens_*[i + 1]`. Each sequence's queries are its last tokens: query `j` of a sequence with
    `q_len` queries and `k_len` keys sees keys `0 .. k_len - q_len + j` (bottom-right aligned causal mask), which is
    what a cache holding earlier tokens needs. Returns `[total_q, heads, dim]`.
    """
    if query.shape[0] == 0:
        return query
    backend = select_attention_backend(query.device, query.dtype, attn_implementation)
    if backend == "flash_attn":
        return _flash_attn_varlen_func()(
            query, key, value, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k,
            dropout_p=dropout, softmax_scale=scaling, causal=True,
        )
    if backend == "torch_varlen":
        return _torch_varlen_attn()(
            query, key, value, cu_seqlens_q.int(), cu_seqlens_k.int(), max_seqlen_q, max_seqlen_k,
            scale=scaling, window_size=(-1, 0), enable_gqa=query.shape[1] != key.shape[1],
        )
    if dropout > 0.0:
        raise NotImplementedError("attention dropout is not supported by MoD's packed attention")
    return _sdpa_packed_attention(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scaling)


def decode_attention(
    query: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    new_lens: list[int],
    scaling: float,
) -> torch.Tensor:
    """Attention of one new token per sequence (those with `new_lens[b] == 1`) over that sequence's cached K/V.

    `query` is `[n, heads, dim]` for the sequences with a new token, in order; `keys[b]`/`values[b]` are
    `[tokens_b, kv_heads, dim]` and already hold the new token. The newest token sees every cached one, so no mask.
    """
    outputs = []
    j = 0
    for b, n in enumerate(new_lens):
        if not n:
            continue
        q = query[j : j + 1].transpose(0, 1).unsqueeze(0)  # [1, heads, 1, dim]
        k, v = keys[b].transpose(0, 1).unsqueeze(0), values[b].transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
        outputs.append(out[0].transpose(0, 1))
        j += 1
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------------------------------
# Ragged KV cache
# --------------------------------------------------------------------------------------------------------------------


def _cumsum0(lengths: torch.Tensor) -> torch.Tensor:
    return F.pad(lengths.cumsum(0), (1, 0))


class MoDCacheLayer(CacheLayerMixin):
    """One layer's K/V: for each sequence, a `[tokens, kv_heads, head_dim]` tensor holding only the tokens that ran
    this layer, so memory is exactly what the routed tokens need. `steps` records the input column each cached token
    came from, so the cache can be cropped back to an earlier length."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self):
        super().__init__()
        self.keys: list[torch.Tensor] | None = None
        self.values: list[torch.Tensor] | None = None
        self.steps: list[torch.Tensor] | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("MoDCacheLayer stores ragged K/V: use `append`")

    def append(
        self, key_states: torch.Tensor, value_states: torch.Tensor, seq_lens: list[int], steps: torch.Tensor
    ) -> None:
        """Append each sequence's new routed K/V (packed: `seq_lens[b]` rows for sequence `b`) after its cached ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = [t.split(seq_lens) for t in (key_states, value_states, steps)]
        if self.keys is None:
            # Own copies per sequence (not views of the packed batch), so each one can be freed on its own.
            own = (lambda t: t) if len(seq_lens) == 1 else (lambda t: t.clone())
            self.keys, self.values, self.steps = ([own(t) for t in parts] for parts in new)
            return
        for b, n in enumerate(seq_lens):
            if n:
                self.keys[b] = torch.cat([self.keys[b], new[0][b]])
                self.values[b] = torch.cat([self.values[b], new[1][b]])
                self.steps[b] = torch.cat([self.steps[b], new[2][b]])

    def packed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """All sequences' K/V packed one after the other, their `cu_seqlens` and the longest length."""
        lens = torch.tensor([k.shape[0] for k in self.keys], device=self.keys[0].device)
        return torch.cat(self.keys), torch.cat(self.values), _cumsum0(lens), int(lens.max())

    def seq_lens(self) -> list[int]:
        return [] if self.keys is None else [k.shape[0] for k in self.keys]

    def get_seq_length(self) -> int:
        return max(self.seq_lens(), default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.steps = None
        self.is_initialized = False

    def select_sequences(self, indices: torch.Tensor) -> None:
        """Keep the sequences `indices` (in that order; repeats allowed): beam reordering, expansion, selection."""
        if self.keys is not None:
            order = indices.tolist()
            self.keys, self.values, self.steps = ([parts[i] for i in order] for parts in
                                                  (self.keys, self.values, self.steps))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_sequences(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self.select_sequences(torch.arange(len(self.keys)).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_sequences(indices)

    def crop_to_step(self, num_steps: int) -> None:
        """Drop every cached token that came from input column `num_steps` or later."""
        if self.keys is None:
            return
        keep = [s < num_steps for s in self.steps]
        self.keys, self.values, self.steps = ([t[k] for t, k in zip(parts, keep)] for parts in
                                              (self.keys, self.values, self.steps))

    def crop(self, tokens_to_remove: int) -> None:  # the container crops by step, see MoDCache.crop
        raise NotImplementedError("crop a MoDCache through MoDCache.crop")

    def kv_bytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(t.numel() * t.element_size() for parts in (self.keys, self.values) for t in parts)


class MoDCache(Cache):
    """KV cache of a MoD model: per layer and per sequence, only the tokens that ran that layer.

    `get_seq_length()` is the number of input columns seen so far (what positions and masks count), not what any
    layer holds. `kv_bytes()` is the memory held by keys and values.
    """

    is_compileable = False

    def __init__(self, config: MoDConfig | None = None, num_layers: int | None = None, **kwargs):
        if num_layers is None:
            if config is None:
                raise ValueError("MoDCache needs a config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[MoDCacheLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        raise NotImplementedError("MoDCache stores ragged K/V: use `layers[i].append`")

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("MoDCache.crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0:
            return
        self.seen_tokens = max(0, self.seen_tokens + tokens_to_remove)
        for layer in self.layers:
            layer.crop_to_step(self.seen_tokens)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def kv_bytes(self) -> int:
        """Bytes held by cached keys and values, all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def cached_tokens(self) -> list[int]:
        """Total cached tokens (over sequences) per layer."""
        return [sum(layer.seq_lens()) for layer in self.layers]

    @property
    def batch_size(self) -> int:
        sizes = [len(layer.keys) for layer in self.layers if layer.keys is not None]
        return -1 if not sizes else sizes[0]

    @property
    def is_initialized(self) -> bool:
        return any(layer.is_initialized for layer in self.layers)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MoDModelOutputWithPast(ModelOutput):
    """Output of [`MoDModel`].

    Args:
        last_hidden_state: hidden states after the final norm, `[batch, seq, hidden]`.
        cache: the [`MoDCache`] when `use_cache=True`.
        hidden_states: embeddings and each layer's output (the last after the final norm), when asked for.
        aux_loss: the routing objective already weighted by its coefficients (layer-load objective for `"threshold"`
            routing, top-k BCE for `"topk"`); `None` when no layer routes.
        routed_fraction: `[num_layers]`, the fraction of (non-padding) tokens that ran each layer in this call
            (1.0 for unrouted layers). Its mean is the executed fraction of token-layer work.
        router_decisions: per layer, `[batch, seq]` bool: which tokens ran it (when `output_router_decisions=True`).
        router_logits: per layer, `[batch, seq]` float32 router logits (gate = sigmoid(logit)), `None` for unrouted
            layers (when `output_router_decisions=True`).
    """

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    routed_fraction: torch.Tensor | None = None
    router_decisions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor | None, ...] | None = None


@dataclass
class MoDCausalLMOutputWithPast(ModelOutput):
    """Output of [`MoDForCausalLM`]: `loss` is `lm_loss + aux_loss` when labels are given; the other fields are as in
    [`MoDModelOutputWithPast`]."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    routed_fraction: torch.Tensor | None = None
    router_decisions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor | None, ...] | None = None


class MoDRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class MoDRotaryEmbedding(nn.Module):
    def __init__(self, config: MoDConfig):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = self.config.rope_parameters["rope_type"]
        rope_init_fn = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(self.config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MoDConfig, **kwargs) -> tuple[torch.Tensor, float]:
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """RoPE on packed `[tokens, heads, dim]` queries/keys with per-token `[tokens, dim]` cos/sin."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class MoDMLP(nn.Module):
    def __init__(self, config: MoDConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class PackedBatch:
    """A layer's routed tokens, packed: per-sequence counts and offsets, and each token's RoPE cos/sin and input
    column (kept by the cache)."""

    seq_lens_list: list[int]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    cos: torch.Tensor
    sin: torch.Tensor
    steps: torch.Tensor | None


class MoDAttention(nn.Module):
    """Causal self-attention over packed routed tokens; K/V of routed tokens only go to the cache."""

    def __init__(self, config: MoDConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = MoDRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = MoDRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, packed: PackedBatch, cache: MoDCache | None) -> torch.Tensor:
        n = hidden_states.shape[0]
        query = self.q_proj(hidden_states).view(n, self.num_heads, self.head_dim)
        key = self.k_proj(hidden_states).view(n, self.num_kv_heads, self.head_dim)
        value = self.v_proj(hidden_states).view(n, self.num_kv_heads, self.head_dim)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary_pos_emb(query, key, packed.cos, packed.sin)

        if cache is None or cache.layers[self.layer_idx].keys is None:
            # No earlier tokens: attend among this call's routed tokens.
            if cache is not None:
                cache.layers[self.layer_idx].append(key, value, packed.seq_lens_list, packed.steps)
            attn_output = self._packed_attention(query, key, value, packed.cu_seqlens, packed.max_seqlen, packed)
        else:
            layer_cache = cache.layers[self.layer_idx]
            layer_cache.append(key, value, packed.seq_lens_list, packed.steps)
            if packed.max_seqlen == 1:
                # Decoding: each sequence has at most one new token; attend to its own cached tokens directly.
                attn_output = decode_attention(query, layer_cache.keys, layer_cache.values, packed.seq_lens_list,
                                               self.scaling)
            else:
                key, value, cu_seqlens_k, max_seqlen_k = layer_cache.packed()
                attn_output = self._packed_attention(query, key, value, cu_seqlens_k, max_seqlen_k, packed)
        return self.o_proj(attn_output.reshape(n, -1))

    def _packed_attention(self, query, key, value, cu_seqlens_k, max_seqlen_k, packed: "PackedBatch"):
        return packed_causal_attention(
            query, key, value, packed.cu_seqlens, cu_seqlens_k, packed.max_seqlen, max_seqlen_k, self.scaling,
            attn_implementation=self.config._attn_implementation,
            dropout=self.attention_dropout if self.training else 0.0,
        )


class MoDRouter(nn.Module):
    """Scores each token for one routed layer: `logit = w . rms_normalise(h) + b`, gate `g = sigmoid(logit)`.

    The input is the layer's input hidden state, RMS-normalised without a learned scale (our choice: the paper does
    not say) so that the logit scale does not depend on the residual stream's magnitude. The router starts at `w = 0`
    and `b = config.router_init_bias`. It runs in float32 so that routing decisions do not depend on the dtype.
    """

    def __init__(self, config: MoDConfig, layer_idx: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = config.rms_norm_eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return F.linear(x, self.weight.float(), self.bias.float()).squeeze(-1)


@dataclass
class LayerRouting:
    """One layer's routing decision: which tokens run it, their gate values, and its share of the routing loss."""

    mask: torch.Tensor
    gate: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class MoDDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer that computes only its routed tokens.

    A routed token `h` becomes `a = h + g * Attn(norm1(h))`, `h' = a + g * MLP(norm2(a))`; a skipped token keeps
    `h' = h` and writes no K/V. With `gate_mode="exact"` the forward value of g is 1. Unrouted layers run every
    (non-padding) token with no gate.
    """

    def __init__(self, config: MoDConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_routed = config.router_kind != "dense" and layer_idx in config.routed_layers
        self.self_attn = MoDAttention(config, layer_idx)
        self.mlp = MoDMLP(config)
        self.input_layernorm = MoDRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoDRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer_idx in config.routed_layers:  # kept under "dense" routing too, so weights round-trip
            self.router = MoDRouter(config, layer_idx)

    def route(self, hidden_states: torch.Tensor, valid: torch.Tensor, has_past: bool) -> LayerRouting:
        if not self.is_routed:
            return LayerRouting(mask=valid)
        logits = self.router(hidden_states)
        gate = torch.sigmoid(logits)
        p = self.config.threshold_for_layer(self.layer_idx)
        # g >= p  <=>  logit >= log(p / (1 - p)); comparing logits (threshold in float64) stays exact where the
        # float32 sigmoid saturates to 0 or 1.
        logit_threshold = math.log(p) - math.log1p(-p)
        n_valid = valid.sum().clamp(min=1)
        if self.config.router_kind == "topk" and not has_past:
            # Expert choice: the ceil(capacity * n) highest-scoring tokens of each sequence (non-causal).
            k = torch.ceil(valid.sum(1) * self.config.topk_capacity).long()
            ranked = logits.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True)
            rank = torch.empty_like(ranked).scatter_(1, ranked, torch.arange(logits.shape[1], device=logits.device)
                                                     .expand_as(ranked).contiguous())
            mask = (rank < k[:, None]) & valid
            target = mask.float()
            bce = F.binary_cross_entropy_with_logits(logits[valid], target[valid])
            return LayerRouting(mask=mask, gate=gate, logits=logits, aux_loss=self.config.topk_aux_loss_coef * bce)
        mask = (logits >= logit_threshold) & valid
        if self.config.router_kind == "topk":  # decoding a top-k model: the causal rule, no loss
            return LayerRouting(mask=mask, gate=gate, logits=logits)
        # Layer-load objective: F (fraction routed, no gradient) times G (mean gate, with gradient).
        routed_frac = (mask.sum() / n_valid).detach()
        if self.config.load_loss_target is not None:
            routed_frac = routed_frac - self.config.load_loss_target
        mean_gate = (gate * valid).sum() / n_valid
        return LayerRouting(
            mask=mask, gate=gate, logits=logits, aux_loss=self.config.load_loss_coef * routed_frac * mean_gate
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        valid: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: MoDCache | None = None,
        past_length: int = 0,
        **kwargs,
    ) -> tuple[torch.Tensor, LayerRouting]:
        batch, seq, hidden = hidden_states.shape
        routing = self.route(hidden_states, valid, has_past=past_length > 0)
        flat = hidden_states.reshape(batch * seq, hidden)
        seq_lens = routing.mask.sum(1)
        if routing.mask.all():
            index = None  # every token runs: no gather/scatter
            x, tok_cos, tok_sin = flat, cos.reshape(batch * seq, -1), sin.reshape(batch * seq, -1)
        else:
            index = routing.mask.reshape(-1).nonzero().squeeze(1)
            if index.numel() == 0:  # every token skips: nothing to compute or cache
                return hidden_states, routing
            x = flat[index]
            tok_cos, tok_sin = cos.reshape(batch * seq, -1)[index], sin.reshape(batch * seq, -1)[index]
        steps = None
        if cache is not None:  # input column of each routed token, kept by the cache so that it can be cropped
            steps = past_length + (torch.arange(batch * seq, device=flat.device) if index is None else index) % seq
        seq_lens_list = seq_lens.tolist()
        packed = PackedBatch(
            seq_lens_list=seq_lens_list, cu_seqlens=_cumsum0(seq_lens), max_seqlen=max(seq_lens_list),
            cos=tok_cos, sin=tok_sin, steps=steps,
        )

        gate = None
        if routing.gate is not None:
            if self.config.gate_mode == "exact":
                # Forward value exactly 1 (g / stop_grad(g), written in log space so it never divides by 0).
                log_g = F.logsigmoid(routing.logits)
                g = torch.exp(log_g - log_g.detach())
            else:
                g = routing.gate
            g = g.reshape(-1) if index is None else g.reshape(-1)[index]
            gate = g.to(x.dtype).unsqueeze(-1)

        attn_out = self.self_attn(self.input_layernorm(x), packed, cache)
        x = x + (attn_out if gate is None else gate * attn_out)
        mlp_out = self.mlp(self.post_attention_layernorm(x))
        x = x + (mlp_out if gate is None else gate * mlp_out)

        out = x.reshape(batch, seq, hidden) if index is None else flat.index_copy(0, index, x).view(batch, seq, hidden)
        return out, routing


class MoDPreTrainedModel(PreTrainedModel):
    config_class = MoDConfig
    config: MoDConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoDDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _supports_attention_backend = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoDRouter):
            init.zeros_(module.weight)
            init.constant_(module.bias, self.config.router_init_bias)


class MoDModel(MoDPreTrainedModel):
    def __init__(self, config: MoDConfig):
        super().__init__(config)
        config.validate_routing()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoDDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MoDRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoDRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_router_decisions: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoDModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if cache is None and past_key_values is not None:
            cache = past_key_values
        if kwargs.pop("output_attentions", False):
            raise ValueError("MoD models use packed attention kernels and cannot return attention weights")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache, cache = False, None  # a layer writing its cache must not be replayed by the backward pass
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]

        if cache is not None and not isinstance(cache, MoDCache):
            if cache.get_seq_length() > 0:
                raise TypeError(
                    f"MoD models need a MoDCache (ragged per-layer K/V), got a filled {type(cache).__name__}"
                )
            cache = MoDCache(self.config)  # an empty standard cache carries no state: swap it
        if use_cache and cache is None:
            cache = MoDCache(self.config)
        past_length = cache.get_seq_length() if cache is not None else 0

        if attention_mask is None:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=inputs_embeds.device)
        elif attention_mask.dim() == 2:
            if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch={batch}, past + {seq})"
                )
            valid = attention_mask[:, -seq:].bool().to(inputs_embeds.device)
        else:
            raise ValueError("MoD models take a 2D padding attention_mask of shape (batch, past + seq), not a 4D mask")

        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq, device=inputs_embeds.device).expand(batch, -1)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        position_ids = position_ids[:, -seq:]
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        routings = []
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, routing = layer(
                hidden_states, valid, cos, sin, cache=cache, past_length=past_length, **kwargs
            )
            routings.append(routing)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.seen_tokens = past_length + seq
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        aux_terms = [r.aux_loss for r in routings if r.aux_loss is not None]
        n_valid = valid.sum().clamp(min=1)
        return MoDModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
            aux_loss=torch.stack(aux_terms).sum() if aux_terms else None,
            routed_fraction=torch.stack([r.mask.sum() / n_valid for r in routings]).detach(),
            router_decisions=tuple(r.mask for r in routings) if output_router_decisions else None,
            router_logits=tuple(r.logits for r in routings) if output_router_decisions else None,
        )


class MoDForCausalLM(MoDPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MoDConfig):
        super().__init__(config)
        self.model = MoDModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        output_router_decisions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> MoDCausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_router_decisions=output_router_decisions,
            output_attentions=kwargs.pop("output_attentions", False),
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = lm_loss = None
        if labels is not None:
            lm_loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = lm_loss
            if outputs.aux_loss is not None:
                aux_loss = outputs.aux_loss.to(lm_loss.device)
                num_items = kwargs.get("num_items_in_batch")
                if num_items is not None:
                    # The Trainer normalises the LM loss over the whole accumulated (and distributed) batch; weight
                    # this micro-batch's routing loss by its share of those tokens so accumulation keeps it as is.
                    aux_loss = aux_loss * (labels[..., 1:] != -100).sum() / num_items
                loss = lm_loss + aux_loss

        output = MoDCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            lm_loss=lm_loss,
            aux_loss=outputs.aux_loss,
            routed_fraction=outputs.routed_fraction,
            router_decisions=outputs.router_decisions,
            router_logits=outputs.router_logits,
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would build a DynamicCache (dense [batch, heads, seq, dim] per layer); MoD needs its ragged one.
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by MoD models, "
                    "which use their own ragged MoDCache"
                )
            model_kwargs["cache"] = MoDCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)


__all__ = [
    "MoDCache",
    "MoDConfig",
    "MoDForCausalLM",
    "MoDModel",
    "MoDPreTrainedModel",
    "packed_causal_attention",
    "select_attention_backend",
]


# Saving any of these classes writes `auto_map` into config.json and copies this file and configuration_mod.py next to
# the weights, so the checkpoint loads anywhere with `trust_remote_code=True`.
MoDConfig.register_for_auto_class()
MoDModel.register_for_auto_class("AutoModel")
MoDForCausalLM.register_for_auto_class("AutoModelForCausalLM")
