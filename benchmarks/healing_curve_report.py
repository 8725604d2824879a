"""The numbers of `benchmarks/healing_curve.py` as markdown tables and a plot, from its JSON.

    python benchmarks/healing_curve_report.py

Writes the tables between the `healing_curve` markers of docs/results.md (the text around them is written by people,
from these numbers, and is left as it is) and the plot docs/healing_curve.png.
"""

from __future__ import annotations

from pathlib import Path

from modification.evaluation import report
from modification.evaluation.plots import pyplot, save_figure

ROOT = Path(__file__).resolve().parents[1]
SECTION = "healing_curve"  # the markers around the generated tables in docs/results.md


def long_key(result: dict) -> str:
    return f"perplexity_{result['kv_curve_settings']['long_context']}"


def points(run: dict) -> list[dict]:
    """The run's points, the unhealed model (0 tokens) first."""
    untrained = [{**run["untrained"], "tokens": 0, "train_minutes": 0.0}] if run.get("untrained") else []
    return untrained + run["points"]


def run_name(run: dict) -> str:
    """The run's name and the length of its learning-rate schedule (its key in the JSON), and whether it is still
    under way (stopped by a time budget, to be continued)."""
    spec = run["spec"]
    name = f"{spec['variant']}@{spec['kv_fraction']}:{spec['objective']}:{spec['recipe']}:{spec['data']}"
    return f"{name} (schedule {run['schedule_tokens']:,})" + ("" if run.get("complete", True) else ", under way")


def row(name: str, m: dict, base: dict, result: dict) -> list[str]:
    long = long_key(result)
    ppl = " / ".join(f"{m['perplexity_512'][k] / base['perplexity_512'][k]:.3f}" for k in base["perplexity_512"])
    lookup = " / ".join(f"{m['lookup'][d]['accuracy']:.2f}" for d in base["lookup"])
    return [name, f"{m['tokens']:,}", f"{m['train_minutes']:.1f}", f"{m['kv_fraction']:.3f}", ppl,
            f"{m[long] / base[long]:.3f}", lookup]


def numbers_tables(result: dict) -> str:
    base, context = result["base"], result["kv_curve_settings"]["long_context"]
    kinds, distances = " / ".join(base["perplexity_512"]), " / ".join(base["lookup"])
    header = ["run (variant@KV:objective:recipe:data, schedule in tokens)", "training tokens", "training min", "KV",
              f"perplexity at 512 (x base; {kinds})", f"perplexity at {context} (x base)",
              f"look-up accuracy ({distances} back)"]
    base_row = ["base: " + " / ".join(f"{v:.1f}" for v in base["perplexity_512"].values()) + f", {context}: "
                f"{base[long_key(result)]:.1f}", "", "", "1.000", "1.000", "1.000",
                " / ".join(f"{base['lookup'][d]['accuracy']:.2f}" for d in base["lookup"])]
    fractions = sorted({run["spec"]["kv_fraction"] for run in result["runs"].values()}, reverse=True)
    parts = []
    for f in fractions:
        rows = [row(run_name(run), m, base, result) for run in result["runs"].values()
                if run["spec"]["kv_fraction"] == f for m in points(run)]
        parts.append([f"### KV fraction {f}", ""] + report.markdown_table(header, [base_row] + rows))
    s = result["settings"]
    parts.append([f"Training: sequences of {s['seq_len']} tokens, batch {s['batch_size']}, {s['warmup_steps']} "
                  "warm-up steps, a cosine learning-rate schedule as long as the run's schedule (a run whose last "
                  "point comes before the schedule's end stopped there); `repeat` data: "
                  f"{s['repeat_share']:.0%} of the blocks end in a repeat of an earlier passage. Training minutes are "
                  "this machine's, evaluation excluded. Commands: "
                  + "; ".join(f"`{c}`" for c in result["commands"]) + "."])
    if result.get("errors"):
        parts.append([f"Failed (see the JSON): {', '.join(e.split(':')[0] for e in result['errors'])}."])
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def plot(result: dict, png_path: Path) -> None:
    plt = pyplot()
    base, long = result["base"], long_key(result)
    middle = sorted(base["lookup"], key=int)[len(base["lookup"]) // 2]
    kinds = list(base["perplexity_512"])
    panels = [("worst text at 512", lambda m: max(m["perplexity_512"][k] / base["perplexity_512"][k] for k in kinds)),
              (f"at {result['kv_curve_settings']['long_context']}", lambda m: m[long] / base[long]),
              (f"look-up, {middle} back / base's",
               lambda m: m["lookup"][middle]["accuracy"] / base["lookup"][middle]["accuracy"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.5))
    for ax, (title, value) in zip(axes, panels):
        for i, run in enumerate(result["runs"].values()):
            pts = points(run)
            style = "o-" if "removal" not in run["spec"]["variant"] else "x--"
            ax.plot([p["tokens"] for p in pts], [value(p) for p in pts], style, color=f"C{i}", label=run_name(run))
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
        ax.set_xlabel("training tokens")
        ax.set_title(("perplexity / base, " if "look-up" not in title else "") + title)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['kv_curve_settings']['base']}: healing against training tokens")
    fig.tight_layout()
    save_figure(fig, png_path)


def write_report(result: dict, md_path: Path, png_path: Path) -> str:
    return report.write_report(result, md_path, SECTION, numbers_tables, png_path, plot)


def main(argv: list[str] | None = None) -> None:
    report.report_main(argv, __doc__, SECTION, ROOT / "benchmarks/results/healing_curve.json",
                       ROOT / "docs/results.md", ROOT / "docs/healing_curve.png", numbers_tables, plot)


if __name__ == "__main__":
    main()
