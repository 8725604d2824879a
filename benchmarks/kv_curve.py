"""Quality against KV and FLOPs at long context (issue 18, item 5): SmolLM2-135M-Instruct (dequantised from Q4_1).

At each KV fraction (K/V entries written over the dense model's), for:

- `attention-fitted` / `block-fitted` / `auto-fitted`: `fit_routers` with `routing_granularity` attention, block or
  auto (the fit picks per layer), no training;
- `attention-removal`: the attention sub-layers of the layers whose attention-only removal costs least on the
  calibration text, removed for every token (MLP kept);
- `block-removal`: whole layers removed, the cheapest by measured removal cost;
- `block-removal-shortgpt`: whole layers removed in ShortGPT's order (highest input/output cosine);

it measures perplexity on the three held-out texts at 512 tokens of context, perplexity on held-out Shakespeare at a
long context (every scored token has at least three quarters of the context behind it), look-up from far back
(a random 128-token passage repeated after held-out text, at several distances), the measured KV fraction and the
FLOP fraction of a prefill at the long context (`RoutingPlan.flop_fraction`), and the CPU seconds of each variant.

Static removals are expressed as MoD models too (routers that send every token past the removed part, no sinks), so
every variant goes through the same forward and the same counting.

    OMP_NUM_THREADS=2 python benchmarks/kv_curve.py            # writes benchmarks/results/kv_curve.json
    python benchmarks/kv_curve.py --resume --kv-fractions 0.8,0.7 # adds points to it (the layers are not re-measured)
    python benchmarks/kv_curve.py --resume --kv-fractions 0.9 --heal-tokens 65536   # and each variant healed
    python benchmarks/kv_curve.py --quick                       # a small run, for a smoke test

What the numbers say is written by people in docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from modification.conversion.atomic import atomic_write_text
from modification.conversion.bases import fetch_base
from modification.conversion.budget import Budget, measured_plan
from modification.conversion.calibrate import calibrate_thresholds
from modification.conversion.checkpoint import load_mod_model, save_checkpoint
from modification.conversion.convert import convert_model
from modification.conversion.data import load_blocks
from modification.conversion.fit import (
    LayerMeasurements,
    LookupBroken,
    calibration_batches,
    fit_routers,
    measure_layers,
    shortgpt_order,
)
from modification.conversion.lookup import lookup_rows
from modification.conversion.results import RESULTS_FILENAME
from modification.conversion.settings import FitOptions, TrainSettings
from modification.conversion.texts import prepare_texts
from modification.conversion.train import train
from modification.evaluation.benchmark import describe_device
from modification.evaluation.quality import score_window, sliding_windows
from modification.modeling import THRESHOLD_LOGIT_LIMIT, MoDForCausalLM

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["attention-fitted", "block-fitted", "auto-fitted", "attention-removal", "block-removal",
            "block-removal-shortgpt"]
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


@dataclass
class Curve:
    """What every variant shares, and the record being written."""

    args: argparse.Namespace
    base: LlamaForCausalLM
    held_out: dict[str, torch.Tensor]  # text kind -> [blocks, 512] held-out blocks
    long_text: torch.Tensor  # held-out Shakespeare, one stream (long-context perplexity, look-up filler)
    calib: list[dict]
    fit_options: FitOptions  # FitOptions' defaults but for the budget and granularity, set per variant
    measured: LayerMeasurements  # of the converted base on `calib`, both granularities, shared by every fit
    shortgpt: list[int]
    base_dir: Path | None = None  # the base's folder (its tokenizer travels with a healed checkpoint)
    train_texts: list[str] = field(default_factory=list)  # the train parts of the texts (calibration, healing)
    result: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


def long_context_perplexity(model, stream: torch.Tensor, context: int, windows: int) -> float:
    """Perplexity of the last quarter of `windows` whole windows of `context` tokens, a quarter apart, from the start of
    `stream`: every scored token has at least 3/4 of the context behind it."""
    stride = context // 4
    windows_all = sliding_windows(stream.numel(), context, stride)
    spans = [(begin, end) for begin, end, _ in windows_all if end - begin == context]
    if len(spans) < windows:
        raise ValueError(f"the long text has {stream.numel()} tokens: too few for {windows} windows of {context}")
    nll = count = 0
    for begin, end in spans[:windows]:
        score = score_window(model, stream[begin:end], stride, is_mod=isinstance(model, MoDForCausalLM))
        nll, count = nll + score.nll, count + score.count
    return math.exp(nll / count)


def evaluate(model, curve: Curve) -> dict:
    """Perplexity per held-out text at 512, long-context perplexity, look-up per distance, KV and FLOP fractions."""
    is_mod = isinstance(model, MoDForCausalLM)
    out: dict = {"perplexity_512": {}}
    ran, tokens = None, 0
    for kind, blocks in curve.held_out.items():
        nll = count = 0
        for block in blocks:
            score = score_window(model, block, block.numel(), is_mod)
            nll, count, tokens = nll + score.nll, count + score.count, tokens + block.numel()
            if is_mod:
                ran = score.routed_tokens if ran is None else [a + b for a, b in zip(ran, score.routed_tokens)]
        out["perplexity_512"][kind] = round(math.exp(nll / count), 4)
    context = curve.args.long_context
    out[f"perplexity_{context}"] = round(long_context_perplexity(model, curve.long_text, context,
                                                                curve.args.long_windows), 4)
    rows = lookup_rows({"model": model}, curve.long_text, curve.args.distances, curve.args.passage_tokens,
                       curve.args.trials)
    out["lookup"] = {str(r["distance"]): {k: round(v, 4) for k, v in r["model"].items()} for r in rows}
    if is_mod:
        plan = measured_plan(model.config, [r / tokens for r in ran])
        out["kv_fraction"] = round(plan.kv_fraction(), 4)
        out[f"flop_fraction_{context}"] = round(plan.flop_fraction(model.config, context), 4)
    else:
        out["kv_fraction"], out[f"flop_fraction_{context}"] = 1.0, 1.0
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Variants: each builds a model at KV fraction `f`, and what to record with it
# ----------------------------------------------------------------------------------------------------------------------


def fitted(curve: Curve, f: float, granularity: str):
    """The fit at `f`; where its look-up guard refuses every plan, the plan it would choose without the guard, marked
    as such (the curve needs the point, and the user the refusal)."""
    options = replace(curve.fit_options, kv_fraction=f, routing_granularity=granularity)
    extra = {}
    try:
        model, record = fit_routers(convert_model(curve.base), curve.calib, options, progress=False,
                                    measured=curve.measured)
    except LookupBroken as refusal:
        extra["lookup_guard_refused"] = str(refusal)
        model, record = fit_routers(convert_model(curve.base), curve.calib, replace(options, min_lookup_share=0.0),
                                    progress=False, measured=curve.measured)
    return model, {"plan": model.config.routing_plan, "chosen_plan": record.chosen_plan,
                   "refused_layers": record.refused_layers, "plans": record.plans, **extra}


def removed(curve: Curve, layers: list[int], granularity: str) -> MoDForCausalLM:
    """The base with `layers`' attention (granularity "attention") or whole blocks ("block") removed for every token:
    routers that send every token past, no sinks."""
    model = convert_model(curve.base, routed_layers=sorted(layers), routing_granularity=granularity,
                          routing_sink_tokens=0, router_threshold=0.5)
    with torch.no_grad():
        for j in layers:
            router = model.model.layers[j].router
            router.weight.zero_()
            router.bias.fill_(-THRESHOLD_LOGIT_LIMIT)
    return model.eval()


def static_removal(curve: Curve, f: float, granularity: str, order: list[int]):
    k = round((1.0 - f) * curve.base.config.num_hidden_layers)
    layers = sorted(order[:k])
    return removed(curve, layers, granularity), {"removed_layers": layers}


def cheapest(curve: Curve, granularity: str) -> list[int]:
    costs = curve.measured.removal_costs[granularity]
    return sorted(range(len(costs)), key=lambda j: costs[j])


BUILDERS = {
    "attention-fitted": lambda curve, f: fitted(curve, f, "attention"),
    "block-fitted": lambda curve, f: fitted(curve, f, "block"),
    "auto-fitted": lambda curve, f: fitted(curve, f, "auto"),
    "attention-removal": lambda curve, f: static_removal(curve, f, "attention", cheapest(curve, "attention")),
    "block-removal": lambda curve, f: static_removal(curve, f, "block", cheapest(curve, "block")),
    "block-removal-shortgpt": lambda curve, f: static_removal(curve, f, "block", curve.shortgpt),
}


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def save(curve: Curve) -> None:
    curve.result["total_seconds"] = round(curve.result.get("earlier_seconds", 0.0) + time.perf_counter() - T0, 1)
    atomic_write_text(Path(curve.args.out), json.dumps(curve.result, indent=1) + "\n")


def heal(curve: Curve, model: MoDForCausalLM, f: float) -> tuple[MoDForCausalLM, dict]:
    """`modification train`'s default healing (LoRA, KL to the dense base at T=2) for `--heal-tokens` of the train
    texts (a token budget, so that every variant sees the same tokens whatever else holds the CPU), then, for a routed
    (not statically removed) model, thresholds recalibrated to `f` on the calibration text: quality at the same KV
    fraction as the unhealed point."""
    args = curve.args
    routed = model.config.routing_plan is not None
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start"
        save_checkpoint(model, start, companions_from=curve.base_dir)
        settings = TrainSettings(model=str(start), out=str(Path(tmp) / "healed"), data=curve.train_texts,
                                 max_tokens=args.heal_tokens, seq_len=args.heal_seq_len,
                                 batch_size=args.heal_batch_size, kv_fraction=f if routed else None,
                                 save_steps=10**6, logging_steps=10, progress=False, seed=0)
        healed = train(settings)
        record = json.loads((healed / RESULTS_FILENAME).read_text())["training"]
        model, _ = load_mod_model(str(healed), dtype=torch.float32)
    if routed:
        calibrate_thresholds(model, curve.calib, Budget(kv_fraction=f), progress=False)
    keep = ("recipe", "distill_weight", "distill_temperature", "lm_weight", "tokens", "minutes", "completed_steps",
            "stopped_by", "final_train_loss")
    return model.eval(), {k: record[k] for k in keep if k in record}


def measure(curve: Curve, variant: str, f: float) -> None:
    """Build and evaluate one variant at KV fraction `f` (and, with --heal-tokens, healed); record it (or its error)
    and save the JSON."""
    start = time.process_time()
    untrained = str(f) in curve.result["results"].get(variant, {})
    try:
        model, extra = BUILDERS[variant](curve, f)
        if not untrained:
            metrics = evaluate(model, curve)
            cpu = round((time.process_time() - start) / 60, 2)
            curve.result["results"].setdefault(variant, {})[str(f)] = {**metrics, **extra, "cpu_minutes": cpu}
            log(f"{variant:24s} kv={f}: {metrics}")
            save(curve)
        if curve.args.heal_tokens:
            start = time.process_time()
            model, training = heal(curve, model, f)
            metrics = evaluate(model, curve)
            cpu = round((time.process_time() - start) / 60, 2)
            curve.result.setdefault("healed", {}).setdefault(variant, {})[str(f)] = {
                **metrics, "training": training, "cpu_minutes": cpu}
            log(f"{variant:24s} kv={f} healed: {metrics} {training}")
    except Exception:  # noqa: BLE001 - one failed variant must not cost the others
        curve.result.setdefault("errors", []).append(f"{variant}@{f}: {traceback.format_exc()}")
        log(f"{variant} at {f} failed:\n{curve.result['errors'][-1]}")
    save(curve)


def setup(args) -> Curve:
    """The base, the held-out and calibration text, and the fit's options: what every measurement shares (the layer
    measurements are taken by `run`, or read from a recorded run by `use_recorded_measurements`)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base_dir = Path(args.base) if Path(args.base).is_dir() else fetch_base(args.base, progress=False)
    texts = prepare_texts(args.texts)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    held_out = {}
    for kind, paths in texts.items():
        blocks = load_blocks([str(paths["held_out"])], tokenizer, 512, progress=False)[0]
        held_out[kind] = list(blocks[torch.linspace(0, blocks.shape[0] - 1, args.blocks).round().long()])
    long_text = torch.tensor(tokenizer(texts[args.texts[0]]["held_out"].read_text())["input_ids"])
    data = [str(t["train"]) for t in texts.values()]
    calib, _ = calibration_batches(data, tokenizer, 512, args.calib_blocks, 0.0, progress=False)
    options = FitOptions(kv_fraction=0.8, routing_granularity="auto")
    return Curve(args, base, held_out, long_text, calib, options, None, [], base_dir, data)


def use_recorded_measurements(curve: Curve, recorded: dict) -> None:
    """The layer measurements and ShortGPT order of a recorded run (the fits rank layers on the recorded costs,
    rounded to 1e-5 nats), so that a later run fits the same plans without measuring again."""
    measured = LayerMeasurements.taken_with(curve.fit_options)
    measured.removal_costs = {g: list(c) for g, c in recorded["removal_cost"].items()}
    measured.lookup = {g: {int(j): a for j, a in acc.items()} for g, acc in recorded["lookup_accuracy"].items()}
    measured.dense_lookup = recorded["dense_lookup"]
    curve.measured, curve.shortgpt = measured, recorded["shortgpt_order"]


def run(args) -> dict:
    curve = setup(args)
    if args.resume:
        return resume(args, curve)
    start = time.process_time()
    measured = measure_layers(convert_model(curve.base), curve.calib, curve.fit_options, progress=False)
    shortgpt, _ = shortgpt_order(curve.base, curve.calib)
    curve.measured, curve.shortgpt = measured, shortgpt
    curve.result = {
        "command": args.command,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "command", "resume")},
        "hardware": describe_device(torch.device("cpu")),
        "calibration_tokens": sum(b["input_ids"].numel() for b in curve.calib),
        "layer_measurement_cpu_minutes": round((time.process_time() - start) / 60, 2),
        "removal_cost": {g: [round(c, 5) for c in costs] for g, costs in measured.removal_costs.items()},
        "lookup_accuracy": {g: {str(j): round(a, 4) for j, a in acc.items()} for g, acc in measured.lookup.items()},
        "dense_lookup": round(measured.dense_lookup, 4),
        "shortgpt_order": shortgpt, "base": None, "results": {},
    }
    log("layers measured")
    start = time.process_time()
    curve.result["base"] = {**evaluate(curve.base, curve), "cpu_minutes": round((time.process_time() - start) / 60, 2)}
    log(f"base: {curve.result['base']}")
    save(curve)
    return measure_all(curve)


def measure_all(curve: Curve) -> dict:
    """Every variant at every KV fraction that `curve.result` does not hold yet."""
    for f in curve.args.kv_fractions:
        for variant in curve.args.variants:
            done = str(f) in curve.result["results"].get(variant, {})
            healed = str(f) in curve.result.get("healed", {}).get(variant, {})
            if not done or (curve.args.heal_tokens and not healed):
                measure(curve, variant, f)
    save(curve)
    return curve.result


def resume(args, curve: Curve) -> dict:
    """Continue the run recorded in `args.out`: its layer measurements, base row and results are kept, its errors are
    retried, the missing points measured."""
    recorded = json.loads(Path(args.out).read_text())
    # what a resumed run may change
    kept = ("out", "command", "resume", "kv_fractions", "variants", "heal_tokens", "heal_seq_len", "heal_batch_size")
    settings = {k: v for k, v in vars(args).items() if k not in kept}
    differ = {k: (recorded["settings"].get(k), v) for k, v in settings.items() if recorded["settings"].get(k) != v}
    if differ:
        raise SystemExit(f"--resume: {args.out} was measured with other settings (recorded, asked): {differ}")
    use_recorded_measurements(curve, recorded)
    earlier = round(recorded.get("earlier_seconds", 0.0) + recorded["total_seconds"], 1)  # the runs before this one
    commands = [*recorded.get("commands", [recorded["command"]]), args.command]
    curve.result = {**recorded, "earlier_seconds": earlier, "errors": [], "commands": commands}
    curve.result["settings"]["kv_fractions"] = sorted({*recorded["settings"]["kv_fractions"], *args.kv_fractions},
                                                      reverse=True)
    curve.result["settings"]["variants"] = [v for v in VARIANTS if v in {*recorded["settings"]["variants"],
                                                                        *args.variants}]
    log(f"resumed from {args.out}: {sum(len(r) for r in recorded['results'].values())} points recorded")
    return measure_all(curve)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    numbers = lambda kind: lambda s: [kind(x) for x in s.split(",")]  # noqa: E731
    parser.add_argument("--base", default="smollm2-135m-instruct", help="a fetch-base name or a Llama folder")
    parser.add_argument("--texts", type=lambda s: s.split(","), default=["shakespeare", "kjv", "gcide"],
                        help="held-out texts; the first also gives the long-context text and the look-up filler")
    parser.add_argument("--kv-fractions", type=numbers(float), default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=VARIANTS)
    parser.add_argument("--blocks", type=int, default=6, help="held-out 512-token blocks per text")
    parser.add_argument("--long-context", type=int, default=4096)
    parser.add_argument("--long-windows", type=int, default=3, help="long-context windows scored")
    parser.add_argument("--distances", type=numbers(int), default=[512, 2048, 6144])
    parser.add_argument("--passage-tokens", type=int, default=128)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--calib-blocks", type=int, default=2, help="calibration blocks of 512 tokens per train text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heal-tokens", type=int, default=None, help="also heal each variant with `modification "
                        "train`'s default objective on this many training tokens and measure it again (`healed` in "
                        "the JSON)")
    parser.add_argument("--heal-seq-len", type=int, default=512)
    parser.add_argument("--heal-batch-size", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out: keep its layer "
                        "measurements and points, retry its errors, measure what is missing")
    parser.add_argument("--quick", action="store_true", help="a small run: 0.8 only, short contexts, few tokens")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/kv_curve.json"))
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/kv_curve.py", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        args.kv_fractions, args.blocks, args.long_context, args.long_windows = [0.8], 1, 1024, 1
        args.distances, args.passage_tokens, args.trials, args.calib_blocks = [256], 32, 1, 1
    if args.resume and not Path(args.out).is_file():
        parser.error(f"--resume: {args.out} does not exist (nothing to continue; run without --resume first)")
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose among {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
