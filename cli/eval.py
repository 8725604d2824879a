"""`modification eval`: perplexity, executed fraction, KV ratio and lm-eval tasks of a MoD checkpoint next to its base
(`evaluate_checkpoint`, described in `evaluation/quality.py`); the numbers are merged into its results.json."""

from __future__ import annotations

import argparse

from .options import (
    add_base_argument, add_device_arguments, add_model_argument, add_out_argument, add_progress_argument,
    add_settings_arguments, command_line, settings_from_args,
)


def register(sub) -> None:
    from modification.evaluation.settings import EvalSettings

    p = sub.add_parser("eval", help="perplexity, executed fraction, KV ratio and lm-eval tasks, MoD next to its base",
                       description=__doc__)
    add_model_argument(p)
    add_base_argument(p)
    p.add_argument("--no-base", action="store_true", help="evaluate the MoD model alone")
    add_settings_arguments(p, EvalSettings, "evaluation")
    add_device_arguments(p)
    add_out_argument(p, required=False, help="folder for results.json, plots and records (default: the checkpoint "
                                             "folder if local, else ./<org--name>)")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    from modification.conversion.results import RESULTS_FILENAME
    from modification.evaluation.loading import default_output_dir
    from modification.evaluation.quality import evaluate_checkpoint
    from modification.evaluation.settings import EvalSettings

    results = evaluate_checkpoint(
        args.model, settings_from_args(EvalSettings, args), base=args.base, use_base=not args.no_base,
        device=args.device, dtype=args.dtype, out=args.out, command=command_line(args), progress=not args.no_progress,
    )
    print_summary(results)
    out = args.out or default_output_dir(args.model)
    print(f"wrote {out}/{RESULTS_FILENAME}")
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
