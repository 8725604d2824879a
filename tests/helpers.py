"""Shared test helpers: tiny base models, a slow reference for routed layers, a Hub-cache layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from modification.conversion.convert import convert_model
from modification.modeling import MoDForCausalLM

VOCAB = 97
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


def tiny_base(arch: str = "llama", seed: int = 0, num_layers: int = 4) -> torch.nn.Module:
    """A tiny random base model of the given architecture (GQA, and llama3 rope scaling for Llama)."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if arch == "llama":
        config = LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        })
        return LlamaForCausalLM(config).eval()
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)).eval()
    raise ValueError(arch)


def randomize_routers(model: MoDForCausalLM, seed: int = 0, scale: float = 3.0, bias: float = 0.0) -> None:
    """Give every router random weights so that a real fraction of tokens skips (about half at bias 0, p 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer, "router"):
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * scale / 8)
                layer.router.bias.fill_(bias)


def routed_model(arch: str = "llama", seed: int = 0, **routing) -> MoDForCausalLM:
    routing.setdefault("router_kind", "threshold")
    model = convert_model(tiny_base(arch, seed=seed), **routing)
    randomize_routers(model, seed=seed)
    return model.eval()


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


@torch.no_grad()
def reference_forward(model: MoDForCausalLM, input_ids, attention_mask=None, position_ids=None):
    """Slow reference: every layer runs every token over the full [batch, seq] grid with a mask that lets a query see
    only earlier routed tokens, then skipped tokens are put back (a whole-block skip), or, in layers with "attention"
    granularity, skipped tokens get no attention output and every valid token runs the MLP, ungated. Returns (logits,
    per-layer routed masks)."""
    cfg = model.config
    inner = model.model
    batch, seq = input_ids.shape
    valid = torch.ones(batch, seq, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if position_ids is None:
        position_ids = torch.arange(seq).expand(batch, -1)
    h = inner.embed_tokens(input_ids)
    cos, sin = inner.rotary_emb(h, position_ids)
    cos, sin = cos[:, None], sin[:, None]
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    masks = []
    for idx, layer in enumerate(inner.layers):
        gate = torch.ones(batch, seq)
        run = valid.clone()
        granularity = cfg.routing_granularity
        if isinstance(granularity, list) and idx in cfg.routed_layers:
            granularity = granularity[cfg.routed_layers.index(idx)]
        attention_only = idx in cfg.routed_layers and granularity == "attention"
        if cfg.router_kind != "dense" and idx in cfg.routed_layers:
            w, b = layer.router.weight.float(), layer.router.bias.float()
            x = h.float()
            logits = (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)) @ w.T + b
            logits = logits.squeeze(-1)
            sig = torch.sigmoid(logits)
            if cfg.router_kind == "topk":
                run = torch.zeros_like(valid)
                for bi in range(batch):
                    cand = valid[bi].nonzero().squeeze(1)
                    k = int(torch.ceil(torch.tensor(len(cand) * cfg.topk_capacity)))
                    top = cand[logits[bi, cand].argsort(descending=True)[:k]]
                    run[bi, top] = True
            else:
                run = (sig >= layer.router.threshold) & valid
            if cfg.gate_mode == "scale":
                gate = sig
        masks.append(run)
        attn = layer.self_attn
        a_in = layer.input_layernorm(h)
        q = attn.q_proj(a_in).view(batch, seq, -1, attn.head_dim)
        k = attn.k_proj(a_in).view(batch, seq, -1, attn.head_dim)
        v = attn.v_proj(a_in).view(batch, seq, -1, attn.head_dim)
        if cfg.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        allowed = causal[None] & run[:, None, :]
        allowed = allowed | torch.eye(seq, dtype=torch.bool)[None]  # skipped queries: anything finite, discarded
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        o = (F.softmax(scores.float(), dim=-1).to(v.dtype) @ v).transpose(1, 2).reshape(batch, seq, -1)
        g = gate[..., None].to(h.dtype)
        if attention_only:
            a = h + torch.where(run[..., None], g * attn.o_proj(o), 0.0)
            out = a + layer.mlp(layer.post_attention_layernorm(a))
            h = torch.where(valid[..., None], out, h)
            continue
        a = h + g * attn.o_proj(o)
        out = a + g * layer.mlp(layer.post_attention_layernorm(a))
        h = torch.where(run[..., None], out, h)
    return model.lm_head(inner.norm(h)), masks


def left_padded_batch(lengths: list[int], seed: int = 0, pad_id: int = 0):
    """Random prompts of the given lengths, left-padded: (input_ids, attention_mask)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


def place_in_hub_cache(folder: Path, cache_dir: Path, repo_id: str, revision: str = "0" * 40) -> Path:
    """Lay out `folder` as the Hub cache does (`models--org--name/snapshots/<rev>/` + `refs/main`)."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def tiny_tokenizer():
    """A small word-level fast tokenizer (ids < VOCAB) built with `tokenizers`, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_base(arch: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny base model with its tokenizer, as a Hub checkpoint folder would hold it."""
    tiny_base(arch, seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def reference_text_files(folder: Path) -> tuple[Path, Path]:
    """Real English text available offline on every CPython: the help topics of the Python documentation
    (`pydoc_data.topics`). Returns (train.txt, held_out.txt), split by topic."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = set(names[::5])
    folder.mkdir(parents=True, exist_ok=True)
    train, test = folder / "train.txt", folder / "held_out.txt"
    train.write_text("\n\n".join(topics[n] for n in names if n not in held))
    test.write_text("\n\n".join(topics[n] for n in names if n in held))
    return train, test


def text_mod_checkpoint(folder: Path, vocab_size: int = 384, seed: int = 0, **routing) -> tuple[Path, Path, Path]:
    """A tiny Llama with a BPE tokenizer trained on real text, converted to a MoD checkpoint folder.

    Returns (mod_dir, train.txt, held_out.txt)."""
    from modification.conversion.convert import convert_checkpoint
    from modification.conversion.corpus import train_tokenizer
    from modification.conversion.settings import ConvertSettings

    train, test = reference_text_files(folder / "text")
    tokenizer = train_tokenizer([train.read_text()], vocab_size=vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    convert_checkpoint(ConvertSettings(base=str(folder / "base"), out=str(folder / "mod"), routing=routing))
    return folder / "mod", train, test


def train_settings(mod, out, train_file, **kw):
    """`TrainSettings` of a short run on a tiny text checkpoint (`text_mod_checkpoint`), `kw` overriding."""
    from modification.conversion.settings import TrainSettings

    base = dict(model=str(mod), out=str(out), steps=4, seq_len=64, batch_size=2, logging_steps=1, save_steps=100,
                data=[str(train_file)], progress=False)
    base.update(kw)
    return TrainSettings(**base)
