"""`modification eval`: perplexity (long context included), the look-up check, the KV and FLOP fractions and lm-eval
tasks of a MoD checkpoint next to its base (`evaluate_checkpoint`, described in `evaluation/quality.py`); the numbers
are merged into its results.json."""

from __future__ import annotations

from modification.evaluation.settings import EvalSettings

HELP = "perplexity, look-up, KV and FLOP fractions and lm-eval tasks, MoD next to its base"
SETTINGS = EvalSettings


def run(settings: EvalSettings) -> dict:
    from modification.conversion.results import RESULTS_FILENAME
    from modification.evaluation.loading import default_output_dir
    from modification.evaluation.quality import evaluate_checkpoint

    results = evaluate_checkpoint(settings)
    print_summary(results)
    print(f"wrote {settings.out or default_output_dir(settings.model)}/{RESULTS_FILENAME}")
    return results


def _scores(scores: dict | None) -> str:
    return "n/a" if scores is None else f"{scores['accuracy']:.3f} (loss {scores['loss']:.3f})"


def print_summary(results: dict) -> None:
    quality = results.get("quality", {})
    for row in quality.get("perplexity", []):
        base = "n/a" if row["base"] is None else f"{row['base']:.3f}"
        kv = row.get("kv_fraction")
        print(f"perplexity {row['dataset']} @{row['context_length']}: mod {row['mod']:.3f}  base {base}"
              + (f"  (KV fraction {kv:.3f}, FLOP fraction {row['flop_fraction']:.3f}, {row['tokens']} tokens with "
                 f">= {row['min_context']} of context)" if kv is not None else ""))
    for row in quality.get("lookup", []):
        print(f"look-up {row['dataset']} distance {row['distance']} ({row['passage_tokens']}-token passage, "
              f"{row['trials']} trials): accuracy mod {_scores(row['mod'])}  base {_scores(row['base'])}")
    for row in quality.get("passkey", []):
        print(f"passkey {row['length']} tokens ({row['trials']} trials): accuracy mod {_scores(row['mod'])}  "
              f"base {_scores(row['base'])}")
    for row in quality.get("tasks", []):
        base = "n/a" if row["base"] is None else f"{row['base']:.4f}"
        print(f"task {row['task']} {row['metric']}: mod {row['mod']:.4f}  base {base}")
    eff = results.get("efficiency", {})
    if "kv_fraction" in eff and "measured_on" in eff:
        flops = ", ".join(f"{value:.4f} @{length}" for length, value in eff["flop_fraction"].items())
        print(f"KV fraction {eff['kv_fraction']:.4f}  FLOP fraction {flops}")
