"""The numbers of `benchmarks/quality_curve.py` as markdown tables and a plot, from its JSON.

    python benchmarks/quality_curve_report.py

Writes the tables between the `quality_curve` markers of docs/results.md (the text around them is written by people,
from these numbers, and is left as it is) and the plot docs/quality_curve.png.
"""

from __future__ import annotations

from pathlib import Path

from modification.evaluation import report
from modification.evaluation.plots import pyplot, save_figure

ROOT = Path(__file__).resolve().parents[1]
SECTION = "quality_curve"  # the markers around the generated tables in docs/results.md
# every variant the curve measures, in the order of the tables, with its line style in the plot
STYLES = {"fitted": ("C0", "o-"), "routers": ("C1", "s-"), "lora": ("C2", "D-"), "topk": ("C4", "v-"),
          "removal": ("C3", "x--"), "removal+lora": ("C5", "P--"), "random": ("C7", ".:")}


def training_table(result: dict) -> list[str]:
    """Minutes each trained variant spent training, per trained fraction."""
    res, training, trained_at = result["results"], result["training"], result["settings"]["trained_fractions"]

    def minutes(v: str, f: float) -> str:
        if str(f) in training.get(v, {}):
            return f"{training[v][str(f)]['seconds'] / 60:.1f}"
        return "0 (not run: = fitted)" if "note" in res[v].get(str(f), {}) else "-"

    rows = [[v] + [minutes(v, f) for f in trained_at] for v in ("routers", "lora", "topk", "removal+lora") if v in res]
    if not rows:
        return []
    header = ["variant"] + [f"f={f}" for f in trained_at]
    return ["Minutes of training per trained run:", ""] + report.markdown_table(header, rows)


def perplexity_table(result: dict, kind: str) -> list[str]:
    """Perplexity on one held-out text, its ratio to the base's, and the executed fraction reached."""
    base, fractions = result["base"][kind], result["settings"]["fractions"]

    def cell(m: dict | None) -> str:
        if m is None:
            return "-"
        return f"{m['perplexity']:.2f} ({m['perplexity'] / base['perplexity']:.2f}x) @ {m['executed_fraction']:.3f}"

    rows = [[v] + [cell(per_f.get(str(f), {}).get(kind)) for f in fractions]
            for v, per_f in _variants(result)]
    return [f"### {kind}: perplexity (x base) at the executed fraction reached; base perplexity "
            f"{base['perplexity']:.2f}, last-word accuracy {base['last_word_accuracy']:.2f}", ""] + \
        report.markdown_table(["variant"] + [f"target {f}" for f in fractions], rows)


def accuracy_table(result: dict) -> list[str]:
    """Last-word accuracy on every held-out text."""
    kinds, fractions = list(result["base"]), result["settings"]["fractions"]

    def cell(m: dict | None) -> str:
        return "-" if m is None else "/".join(f"{m[k]['last_word_accuracy']:.2f}" for k in kinds)

    rows = [["base (1.0)"] + [cell(result["base"])] * len(fractions)]
    rows += [[v] + [cell(per_f.get(str(f))) for f in fractions] for v, per_f in _variants(result)]
    return [f"### Last-word accuracy ({' / '.join(kinds)})", ""] + \
        report.markdown_table(["variant"] + [f"target {f}" for f in fractions], rows)


def plans_table(result: dict) -> list[str]:
    """What `fit_routers` chose at each target, the layers removal deleted and those top-k routed."""
    rows = []
    for f in result["settings"]["fractions"]:
        plan = result["plans"].get(str(f), {})
        topk = plan.get("topk")
        rows.append([str(f), plan.get("chosen_plan", "-"),
                     ", ".join(f"{j}: {s}" for j, s in plan.get("planned_skip", {}).items()),
                     ", ".join(map(str, plan.get("removal_dropped_layers", []))) or "-",
                     f"{', '.join(map(str, topk['layers']))} ({topk['capacity']})" if topk else "-"])
    header = ["target", "`fit_routers` chose", "skipped", "removal drops", "top-k layers (capacity)"]
    return ["### Plans (layer: share of its tokens skipped)", ""] + report.markdown_table(header, rows)


def _variants(result: dict) -> list[tuple[str, dict]]:
    return [(v, result["results"][v]) for v in STYLES if v in result["results"]]


def numbers_tables(result: dict) -> str:
    """The numbers of the JSON as markdown tables."""
    parts = [training_table(result)] + [perplexity_table(result, kind) for kind in result["base"]]
    parts += [accuracy_table(result), plans_table(result)]
    for key, what in (("skipped_for_time", "Not measured (past the time budget)"), ("errors", "Failed (see the JSON)")):
        if result.get(key):
            parts.append([f"{what}: {', '.join(entry.split(':')[0] for entry in result[key])}."])
    return "\n\n".join("\n".join(part) for part in parts if part) + "\n"


def plot(result: dict, png_path: Path) -> None:
    plt = pyplot()
    base, kinds = result["base"], list(result["base"])
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 8.5), squeeze=False)
    for col, kind in enumerate(kinds):
        for row, metric in enumerate(("perplexity", "last_word_accuracy")):
            ax, b = axes[row, col], base[kind][metric]
            for v in [v for v in STYLES if v in result["results"]]:
                pts = sorted(((m[kind]["executed_fraction"], m[kind][metric] / b if metric == "perplexity"
                               else m[kind][metric]) for m in result["results"][v].values()), reverse=True)
                pts = [(1.0, 1.0 if metric == "perplexity" else b)] + pts
                color, style = STYLES[v]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=v)
            ax.invert_xaxis()
            ax.grid(alpha=0.3)
            ax.set_xlabel("executed fraction (measured on the held-out text)")
            if metric == "perplexity":
                ax.set_yscale("log")
                ax.set_title(f"{kind}: perplexity / base ({base[kind]['perplexity']:.1f})")
                ax.set_ylabel("perplexity relative to the base")
            else:
                ax.set_title(f"{kind}: last-word accuracy (base {b:.2f})")
                ax.set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"{result['settings']['base'].split(',')[0]}: quality vs executed fraction")
    fig.tight_layout()
    save_figure(fig, png_path)


def write_report(result: dict, md_path: Path, png_path: Path) -> str:
    return report.write_report(result, md_path, SECTION, numbers_tables, png_path, plot)


def main(argv: list[str] | None = None) -> None:
    report.report_main(argv, __doc__, SECTION, ROOT / "benchmarks/results/quality_curve.json", ROOT / "docs/results.md",
                       ROOT / "docs/quality_curve.png", numbers_tables, plot)


if __name__ == "__main__":
    main()
