"""The numbers of `benchmarks/kv_curve.py` as markdown tables and a plot, from its JSON.

    python benchmarks/kv_curve_report.py

Writes the tables between the `kv_curve` markers of docs/results.md (the text around them is written by people, from
these numbers, and is left as it is) and the plot docs/kv_curve.png.
"""

from __future__ import annotations

from pathlib import Path

from modification.evaluation import report
from modification.evaluation.plots import pyplot, save_figure

ROOT = Path(__file__).resolve().parents[1]
SECTION = "kv_curve"  # the markers around the generated tables in docs/results.md
# every variant the curve measures, in the order of the tables, with its line style in the plot
STYLES = {"attention-fitted": ("C0", "o-"), "auto-fitted": ("C2", "D-"), "block-fitted": ("C1", "s-"),
          "attention-removal": ("C3", "x--"), "block-removal": ("C4", "P--"), "block-removal-shortgpt": ("C7", "v:")}


def long_key(result: dict) -> str:
    return f"perplexity_{result['settings']['long_context']}"


def row(name: str, m: dict, base: dict, result: dict) -> list[str]:
    """One variant at one fraction: perplexity (x base) at 512 per text and at the long context, look-up per distance,
    the measured KV and FLOP fractions, CPU minutes."""
    long, context = long_key(result), result["settings"]["long_context"]
    ppl = " / ".join(f"{m['perplexity_512'][k] / base['perplexity_512'][k]:.2f}" for k in base["perplexity_512"])
    lookup = " / ".join(f"{m['lookup'][d]['accuracy']:.2f}" for d in base["lookup"])
    note = " (look-up guard off: the fit refused every plan)" if "lookup_guard_refused" in m else ""
    chosen = f", {m['chosen_plan']} plan" if "chosen_plan" in m else ""
    return [name + note + chosen, f"{m['kv_fraction']:.3f}", f"{m[f'flop_fraction_{context}']:.3f}", ppl,
            f"{m[long] / base[long]:.2f}", lookup, f"{m.get('cpu_minutes', 0):.1f}"]


def fraction_tables(result: dict) -> list[list[str]]:
    base, context = result["base"], result["settings"]["long_context"]
    kinds, distances = " / ".join(base["perplexity_512"]), " / ".join(base["lookup"])
    header = ["variant", "KV", f"FLOPs at {context}", f"perplexity at 512 (x base; {kinds})",
              f"perplexity at {context} (x base)", f"look-up accuracy ({distances} back)", "CPU min"]
    base_row = ["base: " + " / ".join(f"{v:.1f}" for v in base["perplexity_512"].values()) + f", {context}: "
                f"{base[long_key(result)]:.1f}", "1.000", "1.000", "1.00", "1.00",
                " / ".join(f"{base['lookup'][d]['accuracy']:.2f}" for d in base["lookup"]),
                f"{base.get('cpu_minutes', 0):.1f}"]
    parts = []
    for f in result["settings"]["kv_fractions"]:
        rows = []
        for v in STYLES:
            if str(f) in result["results"].get(v, {}):
                rows.append(row(v, result["results"][v][str(f)], base, result))
            healed = result.get("healed", {}).get(v, {}).get(str(f))
            if healed:
                t = healed["training"]
                name = f"{v}, healed on {t['tokens']:,} tokens ({t['minutes']:.0f} min)"
                rows.append(row(name, healed, base, result))
        if rows:
            parts.append([f"### KV fraction {f}", ""] + report.markdown_table(header, [base_row] + rows))
    return parts


def numbers_tables(result: dict) -> str:
    parts = fraction_tables(result)
    parts.append([f"Layer measurements (shared by every fit): {result['layer_measurement_cpu_minutes']:.1f} CPU "
                  f"minutes on {result['calibration_tokens']} calibration tokens; total "
                  f"{result['total_seconds'] / 60:.0f} minutes; commands: "
                  + "; ".join(f"`{c}`" for c in result.get("commands", [result["command"]])) + "."])
    if result.get("errors"):
        parts.append([f"Failed (see the JSON): {', '.join(e.split(':')[0] for e in result['errors'])}."])
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def plot(result: dict, png_path: Path) -> None:
    plt = pyplot()
    base, context = result["base"], result["settings"]["long_context"]
    long, middle = long_key(result), sorted(base["lookup"], key=int)[len(base["lookup"]) // 2]
    panels = [("kv_fraction", long, f"perplexity at {context} / base", True),
              (f"flop_fraction_{context}", long, f"perplexity at {context} / base", True),
              ("kv_fraction", "lookup", f"look-up accuracy, {middle} tokens back", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.5))
    for ax, (x, y, title, ratio) in zip(axes, panels):
        for v in [v for v in STYLES if v in result["results"]]:
            def value(m: dict) -> float:
                return m[y] / base[y] if ratio else m["lookup"][middle]["accuracy"]

            pts = sorted(((m[x], value(m)) for m in result["results"][v].values()), reverse=True)
            pts = [(1.0, value(base))] + pts
            color, style = STYLES[v]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=v)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.set_xlabel("FLOP fraction at " + str(context) if x.startswith("flop") else "KV fraction (measured)")
        ax.set_title(title)
        if ratio:
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['settings']['base']}: quality against KV and FLOPs, no training")
    fig.tight_layout()
    save_figure(fig, png_path)


def write_report(result: dict, md_path: Path, png_path: Path) -> str:
    return report.write_report(result, md_path, SECTION, numbers_tables, png_path, plot)


def main(argv: list[str] | None = None) -> None:
    report.report_main(argv, __doc__, SECTION, ROOT / "benchmarks/results/kv_curve.json", ROOT / "docs/results.md",
                       ROOT / "docs/kv_curve.png", numbers_tables, plot)


if __name__ == "__main__":
    main()
