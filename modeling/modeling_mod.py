"""MoDification: Mixture-of-Depths decoders converted from Llama-family models.

Each routed layer has a router that scores every token; a token either runs the layer or skips what the layer's
`routing_granularity` lets it skip: the whole layer (`"block"`: its hidden state passes through unchanged) or the
attention sub-layer alone (`"attention"`: it still runs the MLP). Only routed tokens run attention: they are gathered
into a packed `[tokens, hidden]` tensor, attend with variable-length attention over the routed tokens of their own
sequence, and are scattered back. A skipped token writes no key/value in that layer, so `MoDCache` holds, per layer and
per sequence, only the routed tokens: this is where the KV-memory saving comes from.

This file is copied into every MoD checkpoint: it imports only torch, transformers and its sibling configuration file.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import AttentionInterface, PreTrainedModel, slice_logits_to_keep
from transformers.utils import ModelOutput, can_return_tuple, is_torchdynamo_compiling, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mod import MoDConfig

try:  # PyTorch's own FlashAttention varlen API (CUDA only), used by attn_implementation="torch_varlen"
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


logger = logging.get_logger(__name__)

_NO_ATTENTION_WEIGHTS = ("MoD models run packed variable-length attention over routed tokens and cannot return "
                         "attention weights (output_attentions=True)")


# --------------------------------------------------------------------------------------------------------------------
# Packed variable-length causal attention, behind transformers' attention interface
# --------------------------------------------------------------------------------------------------------------------
# Every implementation takes the routed tokens of a layer packed one sequence after the other, in the interface's
# layout with a batch of one: `query` `[1, heads, total_q, dim]`, `key`/`value` `[1, kv_heads, total_k, dim]`, sequence
# `i` owning rows `cu_seq_lens_*[i]:cu_seq_lens_*[i + 1]`, and returns `[1, total_q, heads, dim]`. Each sequence's
# queries are its last tokens: query `j` of a sequence with `q_len` queries and `k_len` keys sees keys
# `0 .. k_len - q_len + j` (bottom-right aligned causal mask), which is what a cache holding earlier tokens needs.
# These are exactly the padding-free varlen arguments of transformers' `flash_attention_forward`, so the flash
# implementations (flash_attention_2/3/4 and flash-attn kernels from the Hub) are transformers' own.


def _causal_sdpa(query, key, value, scaling: float, dropout: float) -> torch.Tensor:
    """SDPA over `[batch, heads, q_len, dim]` queries, the last `q_len` of `k_len` keys (bottom-right causal)."""
    q_len, k_len = query.shape[2], key.shape[2]
    mask = None  # equal lengths: SDPA's own causal mask; one query: it sees every key
    if 1 < q_len < k_len:
        rows = torch.arange(q_len, device=query.device)[:, None]
        mask = torch.arange(k_len, device=query.device)[None, :] <= rows + (k_len - q_len)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=q_len == k_len, scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def sdpa_packed_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scaling: float, dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None, max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The exact path (`eager` and `sdpa`): PyTorch's `scaled_dot_product_attention`, on every device.

    Sequences with equal lengths (one sequence, or a batch that no router or padding thinned out) run as one plain
    batch; decoding (one query per sequence) attends each sequence to its own keys; anything else is padded into a
    batch with a mask.
    """
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    num_seqs = cu_seq_lens_q.shape[0] - 1
    if num_seqs * max_length_q == q.shape[0] and num_seqs * max_length_k == k.shape[0]:
        # Decided on shapes alone (no data-dependent branch), so this path traces, compiles and exports.
        qb, kb, vb = (
            t.reshape(num_seqs, length, *t.shape[1:]).transpose(1, 2)
            for t, length in ((q, max_length_q), (k, max_length_k), (v, max_length_k))
        )
        out = _causal_sdpa(qb, kb, vb, scaling, dropout)
        return out.transpose(1, 2).reshape(q.shape).unsqueeze(0), None

    q_lens, k_lens = cu_seq_lens_q.diff(), cu_seq_lens_k.diff()
    if max_length_q == 1:
        # Decoding: each sequence has at most one new token; it sees every key of its sequence, so no mask.
        outputs = []
        cu_k = cu_seq_lens_k.tolist()
        for b, n in enumerate(q_lens.tolist()):
            if n:
                qb = q[len(outputs) : len(outputs) + 1].transpose(0, 1)[None]
                kb, vb = (t[cu_k[b] : cu_k[b + 1]].transpose(0, 1)[None] for t in (k, v))
                outputs.append(_causal_sdpa(qb, kb, vb, scaling, dropout)[0].transpose(0, 1))
        return torch.cat(outputs).unsqueeze(0), None

    # Several sequences of different lengths: pad each one's tokens into [seqs, max_len, heads, dim] and mask.
    device = q.device
    seq_q = torch.repeat_interleave(torch.arange(num_seqs, device=device), q_lens, output_size=q.shape[0])
    pos_q = torch.arange(q.shape[0], device=device) - cu_seq_lens_q[seq_q]
    seq_k = torch.repeat_interleave(torch.arange(num_seqs, device=device), k_lens, output_size=k.shape[0])
    pos_k = torch.arange(k.shape[0], device=device) - cu_seq_lens_k[seq_k]
    qp = q.new_zeros(num_seqs, max_length_q, *q.shape[1:])
    kp = k.new_zeros(num_seqs, max_length_k, *k.shape[1:])
    vp = v.new_zeros(num_seqs, max_length_k, *v.shape[1:])
    qp[seq_q, pos_q] = q
    kp[seq_k, pos_k] = k
    vp[seq_k, pos_k] = v
    rows = torch.arange(max_length_q, device=device)[None, :, None]
    cols = torch.arange(max_length_k, device=device)[None, None, :]
    offset = (k_lens - q_lens)[:, None, None]
    mask = (cols < k_lens[:, None, None]) & (cols <= rows + offset)
    # Padding query rows would be fully masked (NaN in softmax); let them see everything, they are dropped below.
    mask = mask | (rows >= q_lens[:, None, None])
    out = F.scaled_dot_product_attention(
        qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), attn_mask=mask[:, None], dropout_p=dropout,
        scale=scaling, enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.transpose(1, 2)[seq_q, pos_q].unsqueeze(0), None


def torch_varlen_attention_forward(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
    scaling: float, dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None, max_length_q: int | None = None, max_length_k: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`attn_implementation="torch_varlen"`: PyTorch's FlashAttention varlen kernel (`torch.nn.attention.varlen`)."""
    if dropout > 0.0:
        raise ValueError("attn_implementation='torch_varlen' has no attention dropout; set attention_dropout=0")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    out = varlen_attn(
        q, k, v, cu_seq_lens_q.int(), cu_seq_lens_k.int(), max_length_q, max_length_k, scale=scaling,
        window_size=(-1, 0), enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.unsqueeze(0), None


# MoD's own entries override the library's for these names (a local registry, as the AttentionInterface docs advise);
# every other name is looked up in the library's registry, where flash_attention_2/3/4 and flash-attn Hub kernels map
# to `flash_attention_forward`, which runs the packed layout as is.
MOD_ATTENTION_FUNCTIONS = AttentionInterface()
MOD_ATTENTION_FUNCTIONS["eager"] = sdpa_packed_attention_forward
MOD_ATTENTION_FUNCTIONS["sdpa"] = sdpa_packed_attention_forward
MOD_ATTENTION_FUNCTIONS["torch_varlen"] = torch_varlen_attention_forward
_PACKED_ATTENTION_FUNCTIONS = (sdpa_packed_attention_forward, torch_varlen_attention_forward, flash_attention_forward)


def torch_varlen_available() -> bool:
    """Whether `attn_implementation="torch_varlen"` can run here (PyTorch's varlen API and a CUDA device)."""
    return varlen_attn is not None and torch.cuda.is_available()


def resolve_attention_function(attn_implementation: str | None) -> Callable:
    """The packed attention function for an `attn_implementation` name; a `ValueError` for one MoD cannot run."""
    function = MOD_ATTENTION_FUNCTIONS.get(attn_implementation or "sdpa")
    if function not in _PACKED_ATTENTION_FUNCTIONS:
        raise ValueError(
            f"attn_implementation={attn_implementation!r} cannot run MoD's packed variable-length attention over "
            "routed "
            "tokens; use 'eager' or 'sdpa' (the exact path), 'flash_attention_2', 'flash_attention_3', "
            "'flash_attention_4' or a flash-attn kernel from the Hub (e.g. 'kernels-community/flash-attn2'), or "
            "'torch_varlen' (PyTorch's varlen kernel)"
        )
    return function


# --------------------------------------------------------------------------------------------------------------------
# Ragged KV cache
# --------------------------------------------------------------------------------------------------------------------


def _offsets(lengths: list[int]) -> list[int]:
    """`[0, l0, l0 + l1, ...]`: where each sequence starts when packed, and the total at the end."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return offsets


def _cumsum0(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(_offsets(lengths), dtype=torch.int32, device=device)


def _rows(lengths: list[int], starts: list[int], device: torch.device) -> torch.Tensor:
    """Row indices `starts[b] + (0 .. lengths[b] - 1)` of every sequence `b`, concatenated."""
    total = sum(lengths)
    counts = torch.tensor(lengths, device=device)
    shift = torch.tensor(starts, device=device) - _cumsum0(lengths, device)[:-1]
    return torch.arange(total, device=device) + torch.repeat_interleave(shift, counts, output_size=total)


class MoDCacheLayer(CacheLayerMixin):
    """One layer's K/V: only the tokens that ran this layer, packed one sequence after the other (`keys`/`values`
    `[tokens, kv_heads, head_dim]`, `lengths[b]` rows for sequence `b`): memory is exactly what the routed tokens need,
    and attention reads it as it is. `columns` records the input column each cached token came from, so the cache can
    be cropped back to an earlier length."""

    is_compileable = False
    is_sliding = False
    is_croppable = True
    supports_early_init = False  # the batch size comes with the first update

    def __init__(self):
        super().__init__()
        self.lengths: list[int] = []
        self.columns: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys, self.values = key_states[:0], value_states[:0]
        self.columns = torch.empty(0, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Append each sequence's new K/V after its cached ones. `cache_kwargs` (as transformers' caches take their
        extra arguments) holds `lengths` (the new K/V are packed, `lengths[b]` rows for sequence `b`) and `columns`
        (the input column of each row). Returns all cached keys and values, packed, and each sequence's count."""
        if cache_kwargs is None or not {"lengths", "columns"} <= cache_kwargs.keys():
            raise ValueError("MoDCache.update needs cache_kwargs with 'lengths' and 'columns' (see MoDCacheLayer)")
        lengths, columns = cache_kwargs["lengths"], cache_kwargs["columns"]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.lengths = [0] * len(lengths)
        if len(lengths) != len(self.lengths):
            raise ValueError(f"MoDCache holds {len(self.lengths)} sequences, got {len(lengths)}")
        merged = [a + b for a, b in zip(self.lengths, lengths)]
        if self.keys.shape[0] == 0:
            self.keys, self.values, self.columns = key_states, value_states, columns
        elif len(lengths) == 1:
            self.keys = torch.cat([self.keys, key_states])
            self.values = torch.cat([self.values, value_states])
            self.columns = torch.cat([self.columns, columns])
        else:
            # Interleave: every sequence's new rows go right after its cached ones (one copy, as a single cat).
            self.keys, self.values, self.columns = (
                torch.cat([part for pair in zip(old.split(self.lengths), new.split(lengths)) for part in pair])
                for old, new in ((self.keys, key_states), (self.values, value_states), (self.columns, columns))
            )
        self.lengths = merged
        return self.keys, self.values, self.lengths

    def split(self) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Each sequence's cached keys and values (views)."""
        if not self.is_initialized:
            return (), ()
        return self.keys.split(self.lengths), self.values.split(self.lengths)

    def get_seq_length(self) -> int:
        return max(self.lengths, default=0)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.columns = None
        self.lengths = []
        self.is_initialized = False

    def select_sequences(self, indices: torch.Tensor) -> None:
        """Keep the sequences `indices` (in that order; repeats allowed): beam reordering, expansion, selection."""
        if not self.is_initialized:  # nothing cached yet: every sequence is empty, in any order
            return
        order = indices.tolist()
        starts = _offsets(self.lengths)
        rows = _rows([self.lengths[i] for i in order], [starts[i] for i in order], self.keys.device)
        self.keys, self.values, self.columns = (t.index_select(0, rows) for t in (self.keys, self.values, self.columns))
        self.lengths = [self.lengths[i] for i in order]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_sequences(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.select_sequences(torch.arange(len(self.lengths)).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_sequences(indices)

    def crop_to_column(self, num_columns: int) -> None:
        """Drop every cached token that came from input column `num_columns` or later."""
        if not self.is_initialized:
            return
        keep = self.columns < num_columns
        sequence = torch.repeat_interleave(
            torch.arange(len(self.lengths), device=keep.device), torch.tensor(self.lengths, device=keep.device)
        )
        kept = torch.zeros(len(self.lengths), dtype=torch.long, device=keep.device).index_add_(0, sequence, keep.long())
        self.lengths = kept.tolist()
        self.keys, self.values, self.columns = (t[keep] for t in (self.keys, self.values, self.columns))

    def crop(self, tokens_to_remove: int) -> None:  # the container crops by input column, see MoDCache.crop
        raise NotImplementedError("crop a MoDCache through MoDCache.crop")

    def kv_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class MoDCache(Cache):
    """KV cache of a MoD model: per layer and per sequence, only the tokens that ran that layer.

    Attention writes a layer's routed K/V with `update` and reads back all of that layer's cached K/V; once every layer
    has run, the model calls `advance` with the number of input columns it consumed. `get_seq_length()` is the number
    of input columns seen so far (what positions count), not what any layer holds. `kv_bytes()` is the memory held by
    keys and values; `cached_tokens()` counts them per layer. Beam reordering, `crop` (assisted and prompt-lookup
    decoding) and batch expansion work as for transformers' caches.
    """

    is_compileable = False

    def __init__(self, config: MoDConfig | None = None, num_layers: int | None = None, **kwargs):
        if num_layers is None:
            if config is None:
                raise ValueError("MoDCache needs a config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[MoDCacheLayer() for _ in range(num_layers)])
        self.seen_tokens = 0

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, cache_kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Append layer `layer_idx`'s routed K/V (`[tokens, kv_heads, head_dim]`, packed per sequence) as
        `MoDCacheLayer.update` does; returns that layer's cached keys and values and each sequence's count of them."""
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def advance(self, num_tokens: int) -> None:
        """Count `num_tokens` more input columns as seen (the model calls it once per forward, after every layer)."""
        self.seen_tokens += num_tokens

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` input columns (a negative number, as generation passes it)."""
        if tokens_to_remove > 0:
            raise ValueError("MoDCache.crop takes a negative number of tokens to remove")
        if tokens_to_remove == 0:
            return
        self.seen_tokens = max(0, self.seen_tokens + tokens_to_remove)
        for layer in self.layers:
            layer.crop_to_column(self.seen_tokens)

    def reset(self) -> None:
        super().reset()
        self.seen_tokens = 0

    def kv_bytes(self) -> int:
        """Bytes held by cached keys and values, all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def cached_tokens(self) -> list[int]:
        """Total cached tokens (over sequences) per layer."""
        return [sum(layer.lengths) for layer in self.layers]

    @property
    def batch_size(self) -> int:
        sizes = [len(layer.lengths) for layer in self.layers if layer.is_initialized]
        return -1 if not sizes else sizes[0]

    @property
    def is_initialized(self) -> bool:
        return any(layer.is_initialized for layer in self.layers)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MoDModelOutputWithPast(ModelOutput):
    """Output of [`MoDModel`]; the router fields are `None` unless asked for.

    Args:
        last_hidden_state: hidden states after the final norm, `[batch, seq, hidden]`.
        cache: the [`MoDCache`] when `use_cache=True`.
        hidden_states: embeddings and each layer's output (the last after the final norm), with
            `output_hidden_states=True`.
        attentions: always `None`: MoD attention kernels never form attention weights.
        router_logits: one `[batch, seq]` float32 tensor of raw router logits per routed layer (gate =
            sigmoid(logit)), in the order of `config.routed_layers` (`"dense"` routing too: its routers score the
            tokens, every token runs). With `output_router_logits=True`.
        aux_loss: the raw (unweighted) routing objective summed over routed layers: the layer-load objective
            `sum_j F_j * G_j` for `"threshold"` routing, the top-k BCE for `"topk"`; `None` when no layer routes.
            With `output_router_logits=True`.
        routed_fraction: `[num_layers]`, the fraction of (non-padding) tokens that ran each layer in this call (its
            attention, with `"attention"` granularity; 1.0 for unrouted layers); its mean is the KV fraction (K/V
            entries written over the dense model's), and `RoutingPlan.from_config(config, shares)` gives the FLOP
            fraction. With `output_router_logits=True`.
        router_decisions: per layer, `[batch, seq]` bool: which tokens ran it (its attention, with `"attention"`
            granularity). With `output_router_decisions=True`.
    """

    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    routed_fraction: torch.Tensor | None = None
    router_decisions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MoDCausalLMOutputWithPast(ModelOutput):
    """Output of [`MoDForCausalLM`], in transformers' order (`loss` first when labels are given, then `logits`,
    `cache`, `hidden_states`, `attentions`). `loss` is `lm_loss + config.router_aux_loss_coef * aux_loss`; `lm_loss` is
    the language-modelling loss alone (with labels and a router flag); the other fields are as in
    [`MoDModelOutputWithPast`], except that `output_router_decisions=True` brings every router field."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    aux_loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    routed_fraction: torch.Tensor | None = None
    router_decisions: tuple[torch.Tensor, ...] | None = None


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


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
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
class PackedTokens:
    """The tokens that run a layer, packed one sequence after the other: `index` holds their rows in the flattened
    `[batch * seq]` batch (`None` when every token runs: no gather or scatter, and shapes known in advance, so this path
    traces and exports), `lengths[b]` and the offsets `cu_seq_lens` count each sequence's; `cos`/`sin` are their RoPE,
    `gate` their factor (`None`: 1) and `columns` their input columns (kept by the cache so that it can be cropped)."""

    index: torch.Tensor | None
    lengths: list[int]
    cu_seq_lens: torch.Tensor
    columns: torch.Tensor | None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    gate: torch.Tensor | None = None

    @classmethod
    def pack(cls, decision: "RoutingDecision", hidden_states, position_embeddings=None, cache=None) -> "PackedTokens":
        """The tokens that `decision` runs, of a `[batch, seq, hidden]` batch with its `(cos, sin)` and cache (both
        only for tokens that run attention)."""
        batch, seq = hidden_states.shape[:2]
        mask, device = decision.mask, hidden_states.device
        index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        lengths = [seq] * batch if mask is None else mask.sum(1).tolist()
        columns = None
        if cache is not None:
            rows = torch.arange(batch * seq, device=device) if index is None else index
            columns = cache.get_seq_length() + rows % seq
        tokens = cls(index=index, lengths=lengths, cu_seq_lens=_cumsum0(lengths, device), columns=columns)
        if position_embeddings is not None:
            tokens.cos, tokens.sin = (tokens.gather(t) for t in position_embeddings)
        if decision.gate is not None:
            tokens.gate = tokens.gather(decision.gate).to(hidden_states.dtype).unsqueeze(-1)
        return tokens

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The packed `[tokens, ...]` rows of a `[batch, seq, ...]` tensor."""
        flat = tensor.flatten(0, 1)
        return flat if self.index is None else flat[self.index]

    def gated(self, sublayer_output: torch.Tensor) -> torch.Tensor:
        """A sub-layer's packed output times each token's gate (as it is without a gate)."""
        return sublayer_output if self.gate is None else self.gate * sublayer_output

    def scatter(self, hidden_states: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """`hidden_states` with the packed rows put back in place; the other tokens keep theirs."""
        if self.index is None:
            return packed.view_as(hidden_states)
        return hidden_states.flatten(0, 1).index_copy(0, self.index, packed).view_as(hidden_states)


class MoDAttention(nn.Module):
    """Causal self-attention over packed routed tokens; K/V of routed tokens only go to the cache.

    The attention function is chosen once, from `config._attn_implementation` (see `resolve_attention_function`), when
    the module is built and again on `set_attn_implementation`.
    """

    def __init__(self, config: MoDConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_size, kv_size = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = MoDRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = MoDRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.attention_function = resolve_attention_function(config._attn_implementation)

    def forward(self, hidden_states: torch.Tensor, tokens: PackedTokens, cache: MoDCache | None) -> torch.Tensor:
        # -1, not the config's head count: under tensor parallelism each rank holds a shard of the heads.
        hidden_shape = (hidden_states.shape[0], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape)
        key = self.k_proj(hidden_states).view(hidden_shape)
        value = self.v_proj(hidden_states).view(hidden_shape)
        if self.config.qk_norm:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key = apply_rotary_pos_emb(query, key, tokens.cos, tokens.sin)

        key_lengths, cu_seq_lens_k = tokens.lengths, tokens.cu_seq_lens
        if cache is not None:
            cache_kwargs = {"lengths": tokens.lengths, "columns": tokens.columns}
            key, value, key_lengths = cache.update(key, value, self.layer_idx, cache_kwargs)
            cu_seq_lens_k = _cumsum0(key_lengths, key.device)

        attn_output, _ = self.attention_function(
            self,
            query.transpose(0, 1).unsqueeze(0),
            key.transpose(0, 1).unsqueeze(0),
            value.transpose(0, 1).unsqueeze(0),
            None,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=True,
            cu_seq_lens_q=tokens.cu_seq_lens,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max(tokens.lengths),
            max_length_k=max(key_lengths),
        )
        return self.o_proj(attn_output.reshape(hidden_states.shape[0], -1))


class RoutingDecision(NamedTuple):
    """What a router decided for one layer's tokens: a tuple, so that transformers' output recorder takes the logits
    from it (index 0) as it takes Mixtral's router logits.

    Args:
        logits: `[batch, seq]` float32 raw router logits (`None` for a layer without a router).
        mask: `[batch, seq]` bool, the tokens that run the layer; `None` means every token of the batch runs (no router
            and no padding), so the layer needs no gather or scatter.
        gate: `[batch, seq]`, the factor on the sub-layer outputs of the tokens that run (`None`: 1).
        loss: this layer's raw (unweighted) term of the routing objective (`None` if it has none).
    """

    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    loss: torch.Tensor | None = None


# The largest |logit| a threshold takes: p = sigmoid(+-30) lies strictly inside (0, 1) in float64 (sigmoid(37) rounds
# to 1), and logits beyond it saturate every router this package fits.
THRESHOLD_LOGIT_LIMIT = 30.0


def threshold_to_logit(p: float) -> float:
    """`log(p / (1 - p))`: a token runs a layer with threshold p iff its router logit is `>= threshold_to_logit(p)`."""
    return math.log(p) - math.log1p(-p)


def logit_to_threshold(logit: float) -> float:
    """The threshold p whose logit is `logit` (the inverse of `threshold_to_logit`), clamped to
    `[-THRESHOLD_LOGIT_LIMIT, THRESHOLD_LOGIT_LIMIT]` so that p stays a valid `router_threshold`."""
    return 1.0 / (1.0 + math.exp(-min(max(logit, -THRESHOLD_LOGIT_LIMIT), THRESHOLD_LOGIT_LIMIT)))


class MoDRouter(nn.Module):
    """Base of the routers: scores each token for one routed layer, `logit = w . features(h) + b`.

    The features are the layer's input hidden state, RMS-normalised without a learned scale (our choice: the paper does
    not say) so that the logit scale does not depend on the residual stream's magnitude. The router starts at `w = 0`
    and `b = config.router_init_bias`, and runs in float32 so that routing decisions do not depend on the dtype. Each
    router kind (`ThresholdRouter`, `TopKRouter`) decides from the scores which tokens run and what its share of the
    routing objective is (`decide`); every kind adds the attention sinks (`sink_mask`) and gates the tokens that run
    the same way.

    `override` (not saved; a switch for measurements such as `modification fit`'s) replaces the decision: `"run"`,
    every token runs the layer as in an unrouted layer; `"skip"`, every token but the sinks skips it (what it skips is
    the layer's `routing_granularity`); `None` (the default), the router decides. Either way nothing is gated and
    there is no objective.
    """

    def __init__(self, config: MoDConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(torch.zeros(1, config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(1))
        self.eps = config.rms_norm_eps
        self.override = None

    @property
    def override(self) -> Literal["run", "skip"] | None:
        return self._override

    @override.setter
    def override(self, value: Literal["run", "skip"] | None) -> None:
        if value not in (None, "run", "skip"):
            raise ValueError(f"a router's override must be None, 'run' or 'skip', got {value!r}")
        self._override = value

    @property
    def threshold(self) -> float:
        """This layer's threshold p (read from the config, so that calibration takes effect at once)."""
        return self.config.routed_layer_value("router_threshold", self.layer_idx)

    @property
    def threshold_logit(self) -> float:
        """`threshold_to_logit(self.threshold)`: the logit a token needs to run the layer."""
        return threshold_to_logit(self.threshold)

    def features(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the router scores: `hidden_states` (`[..., hidden]`) in float32, RMS-normalised without a scale."""
        x = hidden_states.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def score(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Router logits `[batch, seq]`, float32."""
        return F.linear(self.features(hidden_states), self.weight.float(), self.bias.float()).squeeze(-1)

    def sink_mask(self, position_ids: torch.Tensor | None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`[batch, seq]` bool: the attention sinks, the first `config.routing_sink_tokens` positions of each sequence,
        which run every routed layer whatever their score (so no layer's K/V ever lacks them). Positions count from
        each sequence's first real token, as generation passes them under left padding (`position_ids=None`: counted
        from `valid`, the non-padding tokens, `valid.cumsum(-1) - 1`); padding (`valid` False) is never a sink."""
        if position_ids is None:
            position_ids = valid.long().cumsum(-1) - 1
        sinks = position_ids < self.config.routing_sink_tokens
        return sinks if valid is None else sinks & valid

    def causal_mask(self, logits: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The causal rule `sigmoid(logit) >= p`: each token decides alone."""
        # Compared as logits: exact where the float32 sigmoid saturates.
        mask = logits >= self.threshold_logit
        return mask if valid is None else mask & valid

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        """The factor on a routed token's sub-layer outputs, through which the router gets its gradient."""
        if self.config.gate_mode == "exact":
            # Forward value exactly 1 (g / stop_grad(g), in log space so that it never divides by 0).
            log_g = F.logsigmoid(logits)
            return torch.exp(log_g - log_g.detach())
        return torch.sigmoid(logits)

    def decide(self, logits: torch.Tensor, valid: torch.Tensor | None, has_past: bool) -> tuple[torch.Tensor, ...]:
        """The tokens this router's rule runs (`[batch, seq]` bool) and its term of the routing objective, or `None`."""
        raise NotImplementedError

    def forward(
        self, hidden_states: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None, has_past: bool
    ) -> RoutingDecision:
        logits = self.score(hidden_states)
        if self.override is not None:
            mask = valid if self.override == "run" else self.sink_mask(position_ids, valid)
            return RoutingDecision(logits=logits, mask=mask)
        mask, loss = self.decide(logits, valid, has_past)
        if self.config.routing_sink_tokens:
            mask = mask | self.sink_mask(position_ids, valid)
        return RoutingDecision(logits=logits, mask=mask, gate=self.gate(logits), loss=loss)


class ThresholdRouter(MoDRouter):
    """MoDification's causal threshold-p router: a token runs the layer iff `sigmoid(logit) >= p`, in training,
    prefill and decoding alike. Its objective is the layer-load term `F * G` (F: fraction of valid tokens routed, no
    gradient, minus `load_loss_target` if set; G: mean gate, with gradient)."""

    def decide(self, logits, valid, has_past):
        mask = self.causal_mask(logits, valid)
        probs = torch.sigmoid(logits)
        if valid is None:
            n_valid, probs_sum = mask.numel(), probs.sum()
        else:
            n_valid, probs_sum = valid.sum().clamp(min=1), (probs * valid).sum()
        routed = (mask.sum() / n_valid).detach()
        target = self.config.routed_layer_value("load_loss_target", self.layer_idx)
        if target is not None:
            routed = routed - target
        return mask, routed * probs_sum / n_valid


class TopKRouter(MoDRouter):
    """Original MoD (expert choice): in training and prefill the `ceil(topk_capacity * n)` highest-scoring valid
    tokens of each sequence run the layer (non-causal), and the router logits learn top-k membership through a BCE
    loss; once a cache holds earlier tokens (decoding), the causal rule `sigmoid(logit) >= p` decides."""

    def decide(self, logits, valid, has_past):
        if has_past:  # top-k membership is undefined one token at a time: the causal rule, no loss
            return self.causal_mask(logits, valid), None
        if valid is None:
            valid = torch.ones_like(logits, dtype=torch.bool)
        k = torch.ceil(valid.sum(1) * self.config.topk_capacity).long()
        ranked = logits.masked_fill(~valid, float("-inf")).argsort(dim=1, descending=True)
        positions = torch.arange(logits.shape[1], device=logits.device).expand_as(ranked).contiguous()
        rank = torch.empty_like(ranked).scatter_(1, ranked, positions)
        mask = (rank < k[:, None]) & valid
        return mask, F.binary_cross_entropy_with_logits(logits[valid], mask[valid].float())


class DenseRouter(MoDRouter):
    """`router_kind="dense"`: every token runs (the base model). The router still scores the tokens, so that its
    logits can be looked at (`output_router_logits`) before routing is switched on, but decides nothing (unless its
    `override` is set): no gate, no objective, no sinks. Its weights are frozen: they get no gradient, and a trainable
    parameter that never gets one breaks `DistributedDataParallel`."""

    def __init__(self, config: MoDConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.requires_grad_(False)

    def forward(self, hidden_states, position_ids, valid, has_past) -> RoutingDecision:
        # Detached: logits only looked at keep no autograd graph (and no float32 activations) alive in training.
        hidden_states = hidden_states.detach()
        if self.override is not None:  # the measurement switch holds for every router kind
            return super().forward(hidden_states, position_ids, valid, has_past)
        return RoutingDecision(logits=self.score(hidden_states), mask=valid)


ROUTER_CLASSES = {"threshold": ThresholdRouter, "topk": TopKRouter, "dense": DenseRouter}


class MoDDecoderLayer(GradientCheckpointingLayer):
    """A Llama decoder layer that computes only the tokens its router lets through.

    A routed token `h` becomes `a = h + g * Attn(norm1(h))`, `h' = a + g * MLP(norm2(a))`. A skipped token writes no
    K/V and, with `routing_granularity="block"`, keeps `h' = h`; with `"attention"` it skips the attention sub-layer
    only, `a = h`, `h' = a + MLP(norm2(a))`, and the gate scales routed tokens' attention output alone. Layers in
    `config.routed_layers` have a `router` (of the kind `config.router_kind`); the others run every (non-padding)
    token with no gate. Returns the new hidden states and the `RoutingDecision` (which tokens ran attention).
    """

    def __init__(self, config: MoDConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MoDAttention(config, layer_idx)
        self.mlp = MoDMLP(config)
        self.input_layernorm = MoDRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MoDRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.has_router = layer_idx in config.routed_layers
        if self.has_router:  # state-dict names `layers.{i}.router.weight` / `.bias`
            self.router = ROUTER_CLASSES[config.router_kind](config, layer_idx)

    @property
    def skips_attention_only(self) -> bool:
        """Whether a token the router skips still runs the MLP (`routing_granularity="attention"`); read from the
        config at every call, as thresholds are, so that a live model can switch."""
        config = self.router.config if self.has_router else None
        return config is not None and config.routed_layer_value("routing_granularity", self.layer_idx) == "attention"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        position_ids: torch.Tensor,
        valid: torch.Tensor | None = None,
        cache: MoDCache | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, RoutingDecision]:
        if self.has_router:
            has_past = cache is not None and cache.get_seq_length() > 0
            decision = self.router(hidden_states, position_ids, valid, has_past)
        else:
            decision = RoutingDecision(mask=valid)
        # The routed tokens run attention; the MLP runs the same tokens ("block") or every valid token, ungated
        # ("attention"): one path, the MLP's tokens packed apart only in the second case.
        tokens = PackedTokens.pack(decision, hidden_states, position_embeddings, cache)
        mlp_tokens = tokens
        if self.skips_attention_only:
            mlp_tokens = PackedTokens.pack(RoutingDecision(mask=valid), hidden_states)
        if sum(mlp_tokens.lengths) == 0:  # every token skips: nothing to compute or cache
            return hidden_states, decision

        hidden = tokens.gather(hidden_states)
        if sum(tokens.lengths):
            residual = hidden
            hidden = self.self_attn(self.input_layernorm(hidden), tokens, cache)
            hidden = residual + tokens.gated(hidden)
        if mlp_tokens is not tokens:  # the attended tokens go back in place, then every valid token is taken
            hidden = mlp_tokens.gather(tokens.scatter(hidden_states, hidden))
        residual = hidden
        hidden = self.mlp(self.post_attention_layernorm(hidden))
        hidden = residual + mlp_tokens.gated(hidden)
        return mlp_tokens.scatter(hidden_states, hidden), decision


class MoDPreTrainedModel(PreTrainedModel):
    config: MoDConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoDDecoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    # Routing makes shapes data-dependent (graph breaks); the dense path alone traces without them.
    _can_compile_fullgraph = False
    _supports_attention_backend = False
    _can_record_outputs = {
        "hidden_states": OutputRecorder(MoDDecoderLayer, index=0),
        "router_logits": OutputRecorder(MoDRouter, index=0),  # as Mixtral's: the routers' logits, in layer order
    }

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MoDRouter):
            init.zeros_(module.weight)
            init.constant_(module.bias, self.config.router_init_bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) on request
        for module in model.modules():  # loading makes every floating-point weight trainable again
            if isinstance(module, DenseRouter):
                module.requires_grad_(False)
        return loaded

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # attention goes through MOD_ATTENTION_FUNCTIONS; transformers' source heuristic cannot see it

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        if requested_attention == "torch_varlen":
            if not torch_varlen_available():
                raise ImportError(
                    "attn_implementation='torch_varlen' needs torch.nn.attention.varlen (PyTorch's FlashAttention "
                    "varlen API) and a CUDA device; use 'sdpa' (the exact path) here"
                )
            return requested_attention
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    def _check_and_adjust_attn_implementation(
        self, attn_implementation: str | None, is_init_check: bool = False, allow_all_kernels: bool = False
    ) -> str:
        applicable = super()._check_and_adjust_attn_implementation(
            attn_implementation, is_init_check, allow_all_kernels)
        resolve_attention_function(applicable)  # refuse, now, an implementation MoD could not run
        return applicable

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        super().set_attn_implementation(attn_implementation, allow_all_kernels=allow_all_kernels)
        for module in self.modules():  # the attention function is chosen here, once, not on every call
            if isinstance(module, MoDAttention):
                module.attention_function = resolve_attention_function(module.config._attn_implementation)


class MoDModel(MoDPreTrainedModel):
    def __init__(self, config: MoDConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MoDDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = MoDRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MoDRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_decisions: bool | None = None,
        **kwargs,
    ) -> MoDModelOutputWithPast:
        r"""
        output_router_logits (`bool`, *optional*):
            Return `router_logits`, the raw `aux_loss` and `routed_fraction` (default: `config.output_router_logits`).
        output_router_decisions (`bool`, *optional*):
            Return `router_decisions` (which tokens ran each layer).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_attentions = kwargs.get("output_attentions")
        if output_attentions or (output_attentions is None and self.config.output_attentions):
            raise ValueError(_NO_ATTENTION_WEIGHTS)
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if cache is not None and not isinstance(cache, MoDCache):
            raise TypeError(
                f"MoD models keep a ragged per-layer cache of routed tokens and need a MoDCache, got a "
                f"{type(cache).__name__}; pass no cache (one is created) or MoDCache(config=model.config)"
            )
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            cache = None  # the layers drop it under checkpointing (a replayed layer would write twice), so must we
        if use_cache and cache is None:
            cache = MoDCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        past_length = cache.get_seq_length() if cache is not None else 0
        valid = self._valid_tokens(attention_mask, batch, seq)

        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + seq, device=inputs_embeds.device).unsqueeze(0)
        elif position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        position_ids = position_ids[:, -seq:].expand(batch, -1)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)

        hidden_states = inputs_embeds
        decisions = []
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, decision = decoder_layer(
                hidden_states, position_embeddings=position_embeddings, position_ids=position_ids, valid=valid,
                cache=cache, **kwargs,
            )
            decisions.append(decision)
        if cache is not None:
            cache.advance(seq)
        hidden_states = self.norm(hidden_states)

        # `router_logits` (and `hidden_states`) are recorded from the modules by `capture_outputs`, as Mixtral's. What
        # follows is not a module output the recorder could collect: `aux_loss` and `routed_fraction` reduce every
        # layer's decision, and `router_decisions` covers the layers without a router too (a `None` mask, every token
        # ran, which the recorder would skip rather than record).
        output = MoDModelOutputWithPast(last_hidden_state=hidden_states, cache=cache)
        if output_router_logits:
            losses = [d.loss for d in decisions if d.loss is not None]
            output.aux_loss = torch.stack(losses).sum() if losses else None
            n_valid = batch * seq if valid is None else valid.sum().clamp(min=1)
            ones = hidden_states.new_ones((), dtype=torch.float32)
            fractions = [ones if d.mask is None else d.mask.sum() / n_valid for d in decisions]
            output.routed_fraction = torch.stack(fractions).detach()
        if output_router_decisions:
            all_tokens = torch.ones(batch, seq, dtype=torch.bool, device=hidden_states.device)
            output.router_decisions = tuple(all_tokens if d.mask is None else d.mask for d in decisions)
        return output

    @staticmethod
    def _valid_tokens(attention_mask: torch.Tensor | None, batch: int, seq: int) -> torch.Tensor | None:
        """`[batch, seq]` bool of the non-padding tokens of this call, or `None` when there is no padding."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise ValueError("MoD models take a 2D padding attention_mask of shape (batch, past + seq), not a 4D mask")
        if attention_mask.shape[0] != batch or attention_mask.shape[1] < seq:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch={batch}, past + {seq})"
            )
        valid = attention_mask[:, -seq:].bool()
        if not is_torchdynamo_compiling() and bool(valid.all()):
            return None  # no padding: unrouted layers run every token without gather or scatter
        return valid


class MoDForCausalLM(MoDPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: MoDConfig):
        super().__init__(config)
        self.model = MoDModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        output_router_logits: bool | None = None,
        output_router_decisions: bool | None = None,
        **kwargs,
    ) -> MoDCausalLMOutputWithPast:
        r"""
        With `labels`, `loss = lm_loss + config.router_aux_loss_coef * aux_loss` whenever a layer routes.

        output_router_logits (`bool`, *optional*):
            Return `router_logits`, the raw `aux_loss`, `lm_loss` and `routed_fraction` (default:
            `config.output_router_logits`).
        output_router_decisions (`bool`, *optional*):
            Return all of the above and `router_decisions` (which tokens ran each layer).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        router_outputs = bool(output_router_logits or output_router_decisions)  # the decisions come with the rest
        outputs: MoDModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=router_outputs or labels is not None,  # the loss needs the routing objective
            output_router_decisions=output_router_decisions,
            return_dict=True,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
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
                loss = lm_loss + self.config.router_aux_loss_coef * aux_loss

        return MoDCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            router_logits=outputs.router_logits if router_outputs else None,
            aux_loss=outputs.aux_loss if router_outputs else None,
            lm_loss=lm_loss if router_outputs else None,
            routed_fraction=outputs.routed_fraction if router_outputs else None,
            router_decisions=outputs.router_decisions,
        )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # generate() would build a DynamicCache (dense [batch, heads, seq, dim] per layer); MoD needs its ragged one.
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False:
            if generation_config.cache_implementation not in (None, "dynamic"):
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r} is not supported by MoD models, "
                    "which use their own ragged MoDCache"
                )
            model_kwargs["cache"] = MoDCache(config=self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def init_continuous_batching(self, *args, **kwargs):
        # Continuous batching (generate_batch) stores K/V in a PagedAttentionCache: one block table for every layer,
        # while a MoD layer caches only its routed tokens.
        raise NotImplementedError(
            "MoD models do not support continuous batching (generate_batch, PagedAttentionCache): each layer caches "
            "only its routed tokens in a MoDCache; use generate()"
        )


__all__ = [
    "MOD_ATTENTION_FUNCTIONS",
    "THRESHOLD_LOGIT_LIMIT",
    "MoDCache",
    "MoDConfig",
    "MoDForCausalLM",
    "MoDModel",
    "MoDPreTrainedModel",
    "MoDRouter",
    "logit_to_threshold",
    "sdpa_packed_attention_forward",
    "threshold_to_logit",
    "torch_varlen_attention_forward",
]


# Saving any of these classes writes `auto_map` into config.json and copies this file and configuration_mod.py next to
# the weights, so the checkpoint loads anywhere with `trust_remote_code=True`.
MoDConfig.register_for_auto_class()
MoDModel.register_for_auto_class("AutoModel")
MoDForCausalLM.register_for_auto_class("AutoModelForCausalLM")
