"""Quality vs compute on a real pretrained model (issue 9, item 5): SmolLM2-135M-Instruct (dequantised from Q4_1).

Held-out perplexity (non-overlapping blocks spread over each held-out text: Shakespeare, KJV, GCIDE) and last-word
(LAMBADA-style) accuracy at several KV fractions (K/V entries written over the dense model's; the JSON's per-text
`executed_fraction` is that share counted from the routers' decisions, which with whole-block routing is also the
share of token-layer work that runs), for:

- `fitted`: MoDification threshold-p, `fit_routers` on calibration blocks of the train texts, no training, routing
  `--granularity` (the fit's default: attention);
- `routers` / `lora`: fitted, then trained with the `routers` / `lora` recipe, thresholds recalibrated;
- `topk`: original MoD top-k (uniform capacity) on the fitted plan's layers, routers fitted as `fit_routers` fits them
  and trained with the `routers` recipe (top-k BCE), evaluated causally: threshold routing on the same router
  weights, thresholds calibrated to the budget;
- `removal` / `removal+lora`: ShortGPT-style static layer removal (highest input/output cosine), as is and healed with
  the `lora` recipe under the same settings as `lora`;
- `random`: random router weights on the fitted plan's layers, calibrated to the same plan (the floor).

Each variant calls the library: the fit (the layers are measured once, `measure_layers`, and every fit reuses the
measurements), training (`train`), calibration, scoring (`score_window`, `last_word_accuracy`) and atomic writes.

    OMP_NUM_THREADS=2 python benchmarks/quality_curve.py --threads 2    # writes benchmarks/results/quality_curve.json
    python benchmarks/quality_curve_report.py                          # its tables in docs/results.md, and the plot

What the numbers say is written by people in docs/results.md, around the generated tables: a new run needs a new
reading.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from modification.conversion.atomic import atomic_write_text
from modification.conversion.bases import fetch_base
from modification.conversion.budget import Budget
from modification.conversion.calibrate import calibrate_thresholds
from modification.conversion.checkpoint import load_mod_model, save_checkpoint
from modification.conversion.convert import convert_model
from modification.conversion.data import load_blocks
from modification.conversion.fit import (
    LayerMeasurements,
    calibration_batches,
    candidate_layers,
    fit_routers,
    fit_settings_record,
    fitted_router_weights,
    fold_thresholds_into_biases,
    measure_layers,
    model_for_plan,
    routable_layers,
    shortgpt_order,
    with_plan,
)
from modification.conversion.settings import FitOptions, TrainSettings
from modification.conversion.texts import prepare_texts
from modification.conversion.train import train
from modification.evaluation.benchmark import describe_device
from modification.evaluation.last_word import clean_boundary_examples, last_word_accuracy
from modification.evaluation.quality import score_window
from modification.modeling import MoDForCausalLM, RoutingPlan

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["fitted", "routers", "lora", "topk", "removal", "removal+lora", "random"]
SAME_AS_FITTED = "identical to fitted: the plan skips whole layers (but the sinks), no router decides"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


@dataclass
class Curve:
    """What every variant shares, and the record being written."""

    args: argparse.Namespace
    base_dir: Path
    tokenizer: object
    base: LlamaForCausalLM
    held_out: dict  # text kind -> {"blocks": [1-D token blocks], "examples": [last-word examples]}
    fit_options: FitOptions  # of every fit, but for the budget
    train_fields: dict  # TrainSettings fields of every trained variant, but for the folders and the recipe
    calib: list[dict]
    measured: LayerMeasurements  # of the converted base on `calib`, shared by every fit
    shortgpt_order: list[int]  # layers by falling input/output cosine: ShortGPT's removal order
    workdir: Path
    result: dict


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def held_out_text(path: Path, tokenizer, args) -> dict:
    """`args.blocks` blocks of `args.seq_len` tokens spread over the whole held-out text, and its last-word examples."""
    blocks = load_blocks([str(path)], tokenizer, args.seq_len, progress=False)[0]
    if blocks.shape[0] < args.blocks:
        raise SystemExit(f"{path} holds only {blocks.shape[0]} blocks of {args.seq_len} tokens, {args.blocks} asked")
    blocks = blocks[torch.linspace(0, blocks.shape[0] - 1, args.blocks).round().long()]
    return {"blocks": list(blocks), "examples": clean_boundary_examples(path.read_text(), tokenizer, args.examples)}


def evaluate(model, curve: Curve) -> dict:
    """Per held-out text: perplexity of every token after the first of each block, the share of the base's
    token-layers whose K/V was written (`executed_fraction`: the KV fraction) and last-word accuracy."""
    is_mod = isinstance(model, MoDForCausalLM)
    out, base_layers = {}, curve.base.config.num_hidden_layers
    for kind, text in curve.held_out.items():
        nll = count = ran = tokens = 0
        for block in text["blocks"]:
            score = score_window(model, block, block.numel(), is_mod)
            nll, count, tokens = nll + score.nll, count + score.count, tokens + block.numel()
            ran += sum(score.routed_tokens) if is_mod else block.numel() * model.config.num_hidden_layers
        executed = round(ran / (tokens * base_layers), 4)
        accuracy = round(last_word_accuracy(model, curve.tokenizer, text["examples"]), 4)
        out[kind] = {"perplexity": round(math.exp(nll / count), 4), "executed_fraction": executed,
                     "last_word_accuracy": accuracy, "tokens": tokens, "examples": len(text["examples"])}
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Variants: each builds a model to evaluate, and what to record with it
# ----------------------------------------------------------------------------------------------------------------------


def fitted(curve: Curve, f: float):
    options = replace(curve.fit_options, kv_fraction=f)
    model, record = fit_routers(convert_model(curve.base), curve.calib, options, progress=False,
                                measured=curve.measured)
    fold_thresholds_into_biases(model)
    plan = RoutingPlan.from_config(model.config)
    curve.result["plans"].setdefault(str(f), {}).update(
        chosen_plan=record.chosen_plan, plan=record.plan, plan_fractions=record.plan_fractions, plans=record.plans,
        # the report's form: layer -> share of its tokens skipped
        planned_skip={str(j): round(1.0 - r, 4) for j, r in zip(plan.routed_layers, plan.routed_share)},
        fit_seconds=record.seconds)
    return model, {"fit_seconds": record.seconds}


def skips_whole_layers(fit: MoDForCausalLM | None) -> bool:
    """Whether the fitted plan skips whole layers only (but the sinks): then no router decides anything."""
    return fit is not None and all(r <= 0.0 for r in RoutingPlan.from_config(fit.config).routed_share)


def random_routers(curve: Curve, fit: MoDForCausalLM, f: float):
    gen = torch.Generator().manual_seed(1)
    plan = RoutingPlan.from_config(fit.config)
    weights = {j: torch.randn((1, fit.config.hidden_size), generator=gen) * 0.05 for j in plan.routed_layers}
    return model_for_plan(fit, plan, weights, replace(curve.fit_options, kv_fraction=f), curve.calib), {}


def trained(curve: Curve, model: MoDForCausalLM, recipe: str, name: str) -> tuple[Path, dict]:
    """`model` saved as a checkpoint and trained by `train` with `recipe`; returns the trained checkpoint's folder
    and the training record (seconds, logged losses)."""
    source, out = curve.workdir / f"{name}-in", curve.workdir / name
    save_checkpoint(model, source, companions_from=curve.base_dir)
    start = time.perf_counter()
    train(TrainSettings(model=str(source), out=str(out), recipe=recipe, progress=False, **curve.train_fields))
    seconds = round(time.perf_counter() - start, 1)
    shutil.rmtree(source)
    keys = ("step", "loss", "lm_loss", "routing_loss", "kv_fraction")
    history = json.loads((out / "training_log.json").read_text())
    return out, {"seconds": seconds, "log": [{k: h[k] for k in keys if k in h} for h in history if "loss" in h]}


def recipe_variant(curve: Curve, fit: MoDForCausalLM, recipe: str, f: float):
    folder, training = trained(curve, fit, recipe, f"{recipe}-{f}")
    model, _ = load_mod_model(str(folder), dtype=torch.float32)
    calibrate_thresholds(model, curve.calib, Budget(kv_fraction=f), progress=False)  # the fit's plan, brought to f
    return model, {"training": training}


def topk(curve: Curve, fit: MoDForCausalLM, f: float):
    """Original MoD: top-k over whole blocks (its granularity), routers fitted on the block Fisher scores."""
    options = replace(curve.fit_options, kv_fraction=f)
    n_layers = fit.config.num_hidden_layers
    budget = (1.0 - f) * n_layers
    layers, note = list(RoutingPlan.from_config(fit.config).routed_layers), "the fitted plan's layers, uniform capacity"
    if 1.0 - budget / len(layers) < 0.25:  # the plan skips (nearly) whole layers: spread the same budget, MoD-style
        candidates, _ = candidate_layers(curve.measured, options, n_layers)
        ranked, _, _ = routable_layers(curve.measured, options, candidates)
        layers = sorted(ranked[: math.ceil(budget / options.max_skip)])
        note = f"the fitted plan skips whole layers; top-k routes the {len(layers)} cheapest layers by measured cost"
    capacity = round(1.0 - budget / len(layers), 6)
    plan = RoutingPlan(n_layers, layers, [capacity] * len(layers), ["block"] * len(layers))
    model = with_plan(fit, plan, routing_sink_tokens=options.routing_sink_tokens, router_kind="topk",
                      topk_capacity=capacity)
    weights = fitted_router_weights(model, {j: "block" for j in layers}, curve.measured, curve.calib, options)
    with torch.no_grad():
        for j, weight in weights.items():
            model.model.layers[j].router.weight.copy_(weight)
    model.config.calibration = None
    folder, training = trained(curve, model, "routers", f"topk-{f}")
    causal = MoDForCausalLM.from_pretrained(folder, router_kind="threshold", router_threshold=0.5, dtype=torch.float32)
    calibrate_thresholds(causal, curve.calib, Budget(kv_fraction=f), progress=False)
    curve.result["plans"][str(f)]["topk"] = {"layers": layers, "capacity": round(capacity, 4), "note": note}
    return causal, {"training": training, "routed_layers": layers, "capacity": round(capacity, 4)}


def removal(curve: Curve, f: float):
    base = curve.base
    drop = sorted(curve.shortgpt_order[: int(math.floor((1.0 - f) * base.config.num_hidden_layers + 0.5))])
    keep = [j for j in range(base.config.num_hidden_layers) if j not in drop]
    model = copy.deepcopy(base)
    model.model.layers = torch.nn.ModuleList([model.model.layers[j] for j in keep])
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[j] for j in keep]
    curve.result["plans"].setdefault(str(f), {})["removal_dropped_layers"] = drop
    return model.eval(), {"dropped_layers": drop}


def removal_lora(curve: Curve, f: float):
    removed, extra = removal(curve, f)
    # `train` takes MoD checkpoints: the shortened base converted with dense routing computes the same function
    folder, training = trained(curve, convert_model(removed, router_kind="dense"), "lora", f"removal+lora-{f}")
    return load_mod_model(str(folder), dtype=torch.float32)[0], {"training": training, **extra}


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def save(curve: Curve) -> None:
    curve.result["timings"]["total_seconds"] = round(time.perf_counter() - T0, 1)
    atomic_write_text(Path(curve.args.out), json.dumps(curve.result, indent=1) + "\n")


def choose_threads(curve: Curve, what: str) -> None:
    """`--threads 0`: 2 torch threads when no other process is runnable, else 1 (two OpenMP threads on one free core
    ran the base evaluation 4x slower than one thread while another job held the other core)."""
    if curve.args.threads:
        return
    others = []
    for _ in range(7):
        others.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1)
        time.sleep(0.1)
    torch.set_num_threads(1 if sorted(others)[3] >= 1 else 2)
    curve.result["thread_choices"].append(f"{what}: {torch.get_num_threads()}")


def measure(curve: Curve, variant: str, f: float, build):
    """Build one variant at KV fraction `f` (`build()` returns the model and what to record with it), evaluate
    it, record it and save the JSON; returns the model. Past the time budget, or on an error, that is recorded
    instead (and None returned), and the run goes on."""
    result = curve.result
    if time.perf_counter() - T0 > curve.args.budget_minutes * 60:
        result["skipped_for_time"].append(f"{variant}@{f}")
        return None
    choose_threads(curve, f"{variant}@{f}")
    start = time.perf_counter()
    try:
        model, extra = build()
        metrics = evaluate(model, curve)
    except Exception:  # noqa: BLE001 - one failed variant must not cost the others
        result.setdefault("errors", []).append(f"{variant}@{f}: {traceback.format_exc()}")
        log(f"{variant} at {f} failed:\n{result['errors'][-1]}")
        save(curve)
        return None
    if "training" in extra:
        result["training"].setdefault(variant, {})[str(f)] = extra["training"]
        extra = {"train_seconds": extra.pop("training")["seconds"], **extra}
    result["results"].setdefault(variant, {})[str(f)] = {**metrics, **extra}
    result["timings"].setdefault(variant, {})[str(f)] = round(time.perf_counter() - start, 1)
    log(f"{variant:13s} f={f}: " + " ".join(f"{k}={m['perplexity']:.2f}@{m['executed_fraction']:.3f}"
                                           for k, m in metrics.items()))
    save(curve)
    return model


def same_as_fitted(curve: Curve, variant: str, f: float, **extra) -> None:
    """Record `variant` as the fitted model's numbers: where the plan skips whole layers no router decides, so random
    routers and router training cannot change the model."""
    fitted_metrics = curve.result["results"]["fitted"][str(f)]
    curve.result["results"].setdefault(variant, {})[str(f)] = {
        **{kind: fitted_metrics[kind] for kind in curve.held_out}, **extra, "note": SAME_AS_FITTED}
    curve.result["timings"].setdefault(variant, {})[str(f)] = 0.0


def run_variants(curve: Curve) -> None:
    """The untrained variants at every fraction first, then the trained ones (0.8 first): when the time budget runs
    out, what is cut is a trained variant at the least central fraction. `fitted` is always measured (the others
    start from it)."""
    wanted, args = set(curve.args.variants), curve.args
    trained_at = sorted(args.trained_fractions, key=lambda f: abs(f - 0.8))
    fits = {}
    for f in args.fractions:
        fit = fits[f] = measure(curve, "fitted", f, lambda: fitted(curve, f))
        if "random" in wanted and skips_whole_layers(fit):
            same_as_fitted(curve, "random", f)
        elif "random" in wanted and fit is not None:
            measure(curve, "random", f, lambda: random_routers(curve, fit, f))
        if "removal" in wanted:
            measure(curve, "removal", f, lambda: removal(curve, f))
        if f not in trained_at:
            del fits[f]
    for f in trained_at:
        fit = fits.pop(f)
        if "removal+lora" in wanted:
            measure(curve, "removal+lora", f, lambda: removal_lora(curve, f))
        if fit is None:
            continue
        if "routers" in wanted and skips_whole_layers(fit):
            same_as_fitted(curve, "routers", f, train_seconds=0.0)
        elif "routers" in wanted:
            measure(curve, "routers", f, lambda: recipe_variant(curve, fit, "routers", f))
        if "lora" in wanted:
            measure(curve, "lora", f, lambda: recipe_variant(curve, fit, "lora", f))
        if "topk" in wanted:
            measure(curve, "topk", f, lambda: topk(curve, fit, f))


def run(args, base_dir: Path, texts: dict[str, dict[str, Path]]) -> dict:
    """Measure every variant on the base in `base_dir` with `texts` (kind -> {"train", "held_out"} paths)."""
    torch.set_num_threads(args.threads or 1)
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    data = [str(t["train"]) for t in texts.values()]
    calib, _ = calibration_batches(data, tokenizer, args.calib_seq_len, args.calib_blocks, 0.0, progress=False)
    options = FitOptions(kv_fraction=1.0, routing_granularity=args.granularity)  # each fit replaces the budget
    held_out = {kind: held_out_text(paths["held_out"], tokenizer, args) for kind, paths in texts.items()}
    start = time.perf_counter()
    measured = measure_layers(convert_model(base), calib, options, progress=False)
    measured_seconds = time.perf_counter() - start
    order, cosine = shortgpt_order(base, calib)
    train_fields = dict(data=data, steps=args.steps, seq_len=args.train_seq_len, batch_size=args.batch_size,
                        save_steps=10**6, logging_steps=max(1, args.steps // 5),
                        max_tokens_per_source=args.train_tokens_per_source)
    train_record = {k: v for k, v in train_fields.items() if k != "data"}
    result = {
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "texts": list(texts),
                     "calibration_tokens": sum(b["input_ids"].numel() for b in calib),
                     "fit": {k: v for k, v in fit_settings_record(options).items() if k != "kv_fraction"},
                     "train": train_record},
        "hardware": {**describe_device(torch.device("cpu")), "cores_visible": os.cpu_count()},
        "base": None, "results": {}, "plans": {}, "training": {}, "skipped_for_time": [], "thread_choices": [],
        "timings": {"layer_measurements": round(measured_seconds, 1)},
        "layer_removal_cost": {g: [round(c, 5) for c in costs] for g, costs in measured.removal_costs.items()},
        "layer_lookup_accuracy": {"dense": measured.dense_lookup, **{
            g: {str(j): round(a, 4) for j, a in accuracy.items()} for g, accuracy in measured.lookup.items()}},
        "shortgpt_cosine": [round(c, 5) for c in cosine],
    }
    curve = Curve(args, base_dir, tokenizer, base, held_out, options, train_fields, calib, measured, order,
                  Path(tempfile.mkdtemp(prefix="quality_curve_")), result)
    log(f"data ready: {len(calib)} calibration blocks, layers measured in {measured_seconds:.0f} s")
    try:
        start = time.perf_counter()
        result["base"] = evaluate(base, curve)
        result["timings"]["base_eval"] = round(time.perf_counter() - start, 1)
        save(curve)
        run_variants(curve)
    finally:
        shutil.rmtree(curve.workdir, ignore_errors=True)
    save(curve)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--base", default="smollm2-135m-instruct", help="a fetch-base name or a Llama folder")
    parser.add_argument("--texts", type=lambda s: s.split(","), default=["shakespeare", "kjv", "gcide"])
    parser.add_argument("--fractions", type=floats, default=[0.9, 0.8, 0.75, 0.7], help="KV fractions")
    parser.add_argument("--granularity", default=FitOptions.__dataclass_fields__["routing_granularity"].default,
                        choices=["attention", "block", "auto"], help="what the fitted routers' skipped tokens skip")
    parser.add_argument("--trained-fractions", type=floats, default=[0.9, 0.8], help="where trained variants run")
    parser.add_argument("--variants", type=lambda s: s.split(","), default=VARIANTS)
    parser.add_argument("--steps", type=int, default=20, help="training steps of every trained variant")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-seq-len", type=int, default=256)
    parser.add_argument("--train-tokens-per-source", type=int, default=200_000)
    parser.add_argument("--blocks", type=int, default=4, help="held-out blocks per text")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per held-out block")
    parser.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration block")
    parser.add_argument("--calib-blocks", type=int, default=2, help="calibration blocks per train text")
    parser.add_argument("--examples", type=int, default=60, help="last-word examples per text")
    parser.add_argument("--threads", type=int, default=2, help="torch threads; 0: 2, or 1 while another process runs")
    parser.add_argument("--budget-minutes", type=float, default=42.0, help="later work is skipped (and listed)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/quality_curve.json"))
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/quality_curve.py", *(sys.argv[1:] if argv is None else argv)])
    args.trained_fractions = [f for f in args.fractions if f in args.trained_fractions]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose among {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base_dir = Path(args.base) if Path(args.base).is_dir() else fetch_base(args.base, progress=False)
    run(args, base_dir, prepare_texts(args.texts))
    log(f"wrote {args.out}; the tables and the plot: python benchmarks/quality_curve_report.py")


if __name__ == "__main__":
    main()
