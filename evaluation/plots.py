"""Pictures of what a MoD model does: per-layer routed fraction, a token x layer routing map (PNG and a small
self-contained HTML page), and benchmark ratios against context length (`modification show-routing` and `bench`, and
`benchmarks/long_context_speed.py`).

matplotlib runs with the Agg backend (files only, no display needed).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import torch


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works headless, in CI and on servers
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Routed fraction per layer
# --------------------------------------------------------------------------------------------------------------------


def plot_routed_fraction(
    per_layer: list[float], routed_layers: list[int], path: str | Path, title: str | None = None
) -> Path:
    """Bar chart: the fraction of tokens that ran each layer (its attention; routed layers in colour), with the mean
    over layers, the KV fraction."""
    plt = pyplot()
    n = len(per_layer)
    mean = sum(per_layer) / n
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n + 2), 3.6))
    colors = ["tab:orange" if i in routed_layers else "tab:gray" for i in range(n)]
    bars = ax.bar(range(n), per_layer, color=colors)
    if n <= 32:
        ax.bar_label(bars, labels=[f"{v:.2f}" if i in routed_layers else "" for i, v in enumerate(per_layer)],
                     fontsize=7, padding=1)
    ax.axhline(mean, color="tab:blue", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of tokens that ran it")
    ax.set_xticks(range(n) if n <= 40 else range(0, n, max(1, n // 20)))
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="tab:orange", label="routed layer"),
                       Patch(color="tab:gray", label="runs every token"),
                       Line2D([], [], color="tab:blue", linestyle="--", label=f"KV fraction {mean:.3f}")],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title or "Routed fraction per layer")
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# Token x layer routing map
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class RoutingMap:
    """What each layer did with each token of one text."""

    tokens: list[str]  # the text of each token
    gates: torch.Tensor  # [layers, tokens] float: sigmoid(router logit); NaN for layers without a router
    ran: torch.Tensor  # [layers, tokens] bool: the token ran the layer
    thresholds: list[float | None]  # per layer: threshold p, None for layers without a router
    gaps: list[str] | None = None  # the text between the previous token and this one (spaces), when known


    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "gates": [[None if g != g else round(float(g), 4) for g in row] for row in self.gates.tolist()],
            "ran": self.ran.int().tolist(),
            "thresholds": self.thresholds,
        }


@torch.no_grad()
def collect_routing(model, tokenizer, text: str, max_tokens: int = 256) -> RoutingMap:
    """Run `text` (its first `max_tokens` tokens) through the MoD model and read its router decisions and gates."""
    if not text or not text.strip():
        raise ValueError("the text is empty")
    try:  # fast tokenizers give character offsets: show each token as the text it covers, spaces included
        encoded = tokenizer(text, return_offsets_mapping=True)
        offsets = encoded["offset_mapping"][:max_tokens]
    except (NotImplementedError, TypeError, ValueError, KeyError):
        encoded, offsets = tokenizer(text), None
    ids = torch.tensor([encoded["input_ids"][:max_tokens]], dtype=torch.long)
    if ids.numel() == 0:
        raise ValueError("the text gives no tokens")
    tokens, gaps = [], []
    previous_end = 0
    for i, token_id in enumerate(ids[0].tolist()):
        start, end = offsets[i] if offsets is not None else (0, 0)
        if end > start:
            gaps.append(text[previous_end:start] if start >= previous_end else "")
            tokens.append(text[start:end])
            previous_end = max(previous_end, end)
        else:  # special tokens (BOS) cover no text
            gaps.append("")
            tokens.append(tokenizer.decode([token_id]))
    device = next(model.parameters()).device
    out = model(input_ids=ids.to(device), output_router_decisions=True, use_cache=False, logits_to_keep=1)
    n_layers = model.config.num_hidden_layers
    gates = torch.full((n_layers, ids.shape[1]), float("nan"))
    for i, logits in zip(model.config.routed_layers, out.router_logits):  # one per routed layer, dense ones too
        gates[i] = torch.sigmoid(logits[0].float()).cpu()
    ran = torch.stack([d[0].cpu() for d in out.router_decisions])
    routed = set(model.config.routed_layers) if model.config.router_kind != "dense" else set()
    layers = model.model.layers
    thresholds = [layers[i].router.threshold if i in routed else None for i in range(n_layers)]
    return RoutingMap(tokens=tokens, gates=gates, ran=ran, thresholds=thresholds, gaps=gaps)


def plot_routing_map(routing: RoutingMap, path: str | Path, title: str | None = None) -> Path:
    """Heatmap, layers x tokens: colour is the gate of routed layers; skipped cells are faded, layers without a router
    dark grey. Below: the fraction of layers each token ran."""
    plt = pyplot()
    import numpy as np
    from matplotlib import colormaps

    n_layers, n_tokens = routing.ran.shape
    gates = routing.gates.numpy()
    ran = routing.ran.numpy()
    rgba = colormaps["viridis"](np.nan_to_num(gates, nan=0.0))
    rgba[~ran] = 0.25 * rgba[~ran] + 0.75  # skipped: faded towards white
    rgba[~ran, 3] = 1.0
    unrouted = np.isnan(gates).all(axis=1)
    rgba[unrouted] = (0.27, 0.27, 0.27, 1.0)
    width = min(max(6.0, 0.18 * n_tokens + 2.5), 40.0)
    fig, (ax, ax_bar) = plt.subplots(2, 1, figsize=(width, 1.2 + 0.28 * n_layers + 1.6), sharex=True,
                                     gridspec_kw={"height_ratios": [max(n_layers, 2), 2]})
    ax.imshow(rgba, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"{i} (p={p:.2f})" if p is not None else f"{i} (all)" for i, p in
                        enumerate(routing.thresholds)], fontsize=7)
    ax.set_ylabel("layer")
    ax.set_title((title + "\n" if title else "") + "gate of each token in each layer (faded: skipped; dark: no router)",
                 fontsize=10)
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=[ax, ax_bar], label="gate sigmoid(router logit)", fraction=0.02, pad=0.01)
    per_token = ran.mean(axis=0)
    ax_bar.bar(range(n_tokens), per_token, color="tab:orange", width=1.0)
    ax_bar.set_ylim(0, 1)
    ax_bar.set_ylabel("layers run", fontsize=8)
    if n_tokens <= 80:
        ax_bar.set_xticks(range(n_tokens))
        ax_bar.set_xticklabels([_label(t) for t in routing.tokens], rotation=90, fontsize=7)
    else:
        ax_bar.set_xlabel("token position")
    return save_figure(fig, path)


def _label(token: str) -> str:
    return token.strip().replace("\n", "\\n").replace("$", r"\$") or repr(token)


_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
#text {{ font-family: ui-monospace, monospace; line-height: 2; white-space: pre-wrap; }}
.tok {{ padding: 2px 0; border-radius: 3px; cursor: default; }}
.tok:hover {{ outline: 2px solid #1f77b4; }}
#tip {{ position: fixed; display: none; background: #fff; border: 1px solid #999; padding: 6px 8px;
        font-size: 12px; box-shadow: 2px 2px 6px rgba(0,0,0,.2); pointer-events: none; }}
#tip table {{ border-collapse: collapse; }} #tip td {{ padding: 0 6px; }}
.skip {{ color: #aaa; }} .legend span {{ padding: 2px 6px; margin-right: 4px; }}
</style></head><body>
<h1>{title}</h1>
<p>{summary}</p>
<p class="legend">Shade: share of layers a token ran
<span style="background: rgba(255,127,14,0.10)">few</span><span style="background: rgba(255,127,14,0.85)">all</span>.
Hover over a token to see its gate in every routed layer.</p>
<div id="text">{spans}</div>
<div id="tip"></div>
<script>
const R = {data};
const tip = document.getElementById("tip");
function row(l) {{
  return R.thresholds[l] === null ? "" : "<tr" + (this.ran[l] ? "" : " class=skip") + "><td>layer " + l +
    "</td><td>gate " + this.gates[l].toFixed(3) + "</td><td>p " + R.thresholds[l].toFixed(3) + "</td><td>" +
    (this.ran[l] ? "ran" : "skipped") + "</td></tr>";
}}
document.querySelectorAll(".tok").forEach(el => {{
  el.addEventListener("mousemove", ev => {{
    const i = +el.dataset.i;
    const t = {{gates: R.gates.map(g => g[i]), ran: R.ran.map(r => r[i])}};
    const runs = t.ran.reduce((a, b) => a + b, 0);
    tip.innerHTML = "<b>token " + i + "</b>: ran " + runs + " of " + t.ran.length + " layers<table>" +
      R.thresholds.map((_, l) => row.call(t, l)).join("") + "</table>";
    tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 14) + "px";
    tip.style.display = "block";
  }});
  el.addEventListener("mouseleave", () => {{ tip.style.display = "none"; }});
}});
</script>
</body></html>
"""


def write_routing_html(routing: RoutingMap, path: str | Path, title: str = "MoD routing") -> Path:
    """A self-contained page (no external files): the text, each token shaded by the share of layers it ran; hovering
    a token shows its gate, the threshold and the decision in every routed layer."""
    ran = routing.ran.float().mean(0).tolist()
    gaps = routing.gaps or [""] * len(routing.tokens)
    spans = "".join(
        f'{html.escape(gap)}<span class="tok" data-i="{i}" style="background: rgba(255,127,14,{0.1 + 0.75 * r:.3f})">'
        f"{html.escape(tok)}</span>"
        for i, (gap, tok, r) in enumerate(zip(gaps, routing.tokens, ran))
    )
    kv_fraction = float(routing.ran.float().mean())
    summary = (f"{len(routing.tokens)} tokens, {routing.ran.shape[0]} layers, KV fraction {kv_fraction:.3f} "
               f"(share of token-layer attention that ran, and of the K/V written).")
    # JSON inside <script>: escape "</" so no token text can close the script element.
    data = json.dumps(routing.to_dict()).replace("</", "<\\/")
    page = _HTML.format(title=html.escape(title), summary=html.escape(summary), spans=spans, data=data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------------------
# Benchmark ratios
# --------------------------------------------------------------------------------------------------------------------


def _prefill_panel(ax, prefill: list[dict], label: str = "", color: str | None = None, spread: bool = True) -> None:
    """Prefill latency ratio against context length (with its paired IQR), next to its FLOP fraction (the ideal)."""
    x = [row["length"] for row in prefill]
    y = [row["latency_ratio"] for row in prefill]
    quartiles = [row.get("latency_ratio_paired") for row in prefill]
    name = f"{label}: " if label else ""
    if spread and all(quartiles):
        lo = [max(row["latency_ratio"] - q["q1"], 0) for row, q in zip(prefill, quartiles)]
        hi = [max(q["q3"] - row["latency_ratio"], 0) for row, q in zip(prefill, quartiles)]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, color=color,
                    label=f"{name}prefill time (median, IQR)")
    else:
        ax.plot(x, y, marker="o", color=color, label=f"{name}prefill time (median)")
    ax.plot(x, [row["flop_fraction"] for row in prefill], linestyle="--", color=color or "black",
            label=f"{name}FLOP fraction (ideal)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x)
    ax.set_xticklabels([str(v) for v in x])


def _decode_panel(ax, rows: list[tuple[str, dict]]) -> None:
    """Decode throughput ratio per (label, row), next to its ideal: 1 / the FLOP fraction of the decoded tokens."""
    import numpy as np

    x = np.arange(len(rows))
    ax.bar(x - 0.2, [row["throughput_ratio"] for _, row in rows], width=0.4, color="tab:green",
           label="decode tokens/s (median)")
    ideal = [1.0 / row["flop_fraction"] for _, row in rows]
    ax.bar(x + 0.2, ideal, width=0.4, color="white", edgecolor="black", hatch="//", label="ideal (1 / FLOP fraction)")
    ax.set_xticks(x)
    ax.set_xticklabels([label for label, _ in rows], fontsize=8)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylim(0, 1.3 * max([1.0] + ideal + [row["throughput_ratio"] for _, row in rows]))
    ax.set_ylabel("MoD / base throughput")
    ax.legend(fontsize=8, loc="upper right")


def plot_bench(bench: dict, path: str | Path, title: str | None = None) -> Path:
    """MoD/base ratios against context length (prefill latency with its spread, FLOP fraction, KV fraction, peak
    memory on CUDA) and, beside it, decode throughput ratio per batch size next to its ideal."""
    plt = pyplot()
    prefill = bench.get("prefill", [])
    decode = bench.get("decode", [])
    fig, axes = plt.subplots(1, 2 if decode else 1, figsize=(11 if decode else 6.5, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if decode else [1]})
    ax = axes[0][0]
    if prefill:
        _prefill_panel(ax, prefill)
        x = [row["length"] for row in prefill]
        ax.plot(x, [row["kv_fraction"] for row in prefill], marker="s", label="KV-cache bytes (KV fraction)")
        if all(row.get("peak_memory_ratio") is not None for row in prefill):
            ax.plot(x, [row["peak_memory_ratio"] for row in prefill], marker="^", label="peak memory")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylim(0, max([1.2] + [row["latency_ratio"] * 1.1 for row in prefill]))
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("MoD / base")
    ax.legend(fontsize=8, loc="lower left")
    setup = bench.get("setup", {})
    ax.set_title(title or f"MoD / base on {setup.get('device', '?')} ({setup.get('dtype', '?')})", fontsize=10)
    if decode:
        ax2 = axes[0][1]
        _decode_panel(ax2, [(str(row["batch_size"]), row) for row in decode])
        ax2.set_xlabel("decode batch size")
        ax2.set_title(f"decode, {decode[0]['prompt_length']}-token prompt", fontsize=10)
    return save_figure(fig, path)


def plot_long_context_speed(variants: dict[str, dict], path: str | Path, title: str | None = None) -> Path:
    """`benchmarks/long_context_speed.py`'s picture: for each variant (e.g. {"attention": bench, "block": bench}, each
    a `run_benchmark` result) its prefill time ratio against context length next to its FLOP fraction, and its
    decode throughput ratio per batch size next to the ideal; the K/V bytes MoD / base beside the prefill times."""
    plt = pyplot()
    colors = dict(zip(variants, ("tab:blue", "tab:orange", "tab:purple", "tab:red")))
    decode = [(f"{name}\nbatch {row['batch_size']}", row)
              for name, bench in variants.items() for row in bench["decode"]]
    fig, axes = plt.subplots(1, 2 if decode else 1, figsize=(12 if decode else 6.5, 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 2] if decode else [1]})
    ax = axes[0][0]
    top = 1.2
    for name, bench in variants.items():
        _prefill_panel(ax, bench["prefill"], label=name, color=colors[name])
        ax.plot([row["length"] for row in bench["prefill"]], [row["kv_fraction"] for row in bench["prefill"]],
                marker="s", linestyle=":", color=colors[name], label=f"{name}: KV-cache bytes (KV fraction)")
        top = max([top] + [row["latency_ratio"] * 1.1 for row in bench["prefill"]])
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylim(0, top)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("MoD / base")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("prefill", fontsize=10)
    if decode:
        ax2 = axes[0][1]
        _decode_panel(ax2, decode)
        ax2.set_title(f"decode after a {decode[0][1]['prompt_length']}-token prompt", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# All pictures of one text's routing
# --------------------------------------------------------------------------------------------------------------------


def show_routing(
    model: str, text: str, out: str | Path = "routing", *, max_tokens: int = 256, device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Path]:
    """Route `text` through the MoD checkpoint `model` and write, into `out`, the token x layer map (routing.png),
    the hover page (routing.html), the per-layer bars (routed_fraction.png) and the raw map (routing.json)."""
    from modification.conversion.checkpoint import load_mod_model

    from .loading import load_tokenizer, pick_device, pick_dtype

    if not text or not text.strip():
        raise ValueError("the text is empty: give some words")
    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    torch_device = pick_device(device)
    mod, folder = load_mod_model(model, dtype=pick_dtype(dtype, torch_device))
    mod = mod.to(torch_device).eval()
    routing = collect_routing(mod, load_tokenizer(folder), text, max_tokens)
    out = Path(out)
    name = Path(model.rstrip("/")).name
    per_layer = routing.ran.float().mean(1).tolist()
    files = {
        "map": plot_routing_map(routing, out / "routing.png", title=f"{name}: routing of {len(routing.tokens)} tokens"),
        "html": write_routing_html(routing, out / "routing.html", title=f"{name}: routing"),
        "bars": plot_routed_fraction(per_layer, mod.config.routed_layers, out / "routed_fraction.png",
                                     title=f"{name}: routed fraction on this text"),
    }
    files["json"] = out / "routing.json"
    files["json"].write_text(json.dumps(routing.to_dict()) + "\n")
    return files
