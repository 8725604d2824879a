"""`modification eval`: perplexity, executed fraction, KV ratio and lm-eval tasks of a MoD checkpoint next to its base
(`evaluate_checkpoint`, described in `evaluation/quality.py`); the numbers are merged into its results.json."""

from __future__ import annotations

from modification.evaluation.settings import EvalSettings


HELP = "perplexity, executed fraction, KV ratio and lm-eval tasks, MoD next to its base"
SETTINGS = EvalSettings


def run(settings: EvalSettings) -> dict:
    from modification.conversion.results import RESULTS_FILENAME
    from modification.evaluation.loading import default_output_dir
    from modification.evaluation.quality import evaluate_checkpoint

    results = evaluate_checkpoint(settings)
    print_summary(results)
    print(f"wrote {settings.out or default_output_dir(settings.model)}/{RESULTS_FILENAME}")
    return results


def print_summary(results: dict) -> None:
    quality = results.get("quality", {})
    for row in quality.get("perplexity", []):
        base = "n/a" if row["base"] is None else f"{row['base']:.3f}"
        fraction = row.get("executed_fraction")
        print(f"perplexity {row['dataset']} @{row['context_length']}: mod {row['mod']:.3f}  base {base}"
              + (f"  (executed fraction {fraction:.3f}, {row['tokens']} tokens)" if fraction is not None else ""))
    for row in quality.get("tasks", []):
        base = "n/a" if row["base"] is None else f"{row['base']:.4f}"
        print(f"task {row['task']} {row['metric']}: mod {row['mod']:.4f}  base {base}")
    eff = results.get("efficiency", {})
    if "executed_fraction" in eff and "measured_on" in eff:
        print(f"executed fraction {eff['executed_fraction']:.4f}  KV ratio {eff['kv_ratio']:.4f}")
