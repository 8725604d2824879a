"""The healing curve (issue 20, item 5): quality against training tokens, SmolLM2-135M-Instruct (dequantised Q4_1).

A run heals one variant of `benchmarks/kv_curve.py` at one KV fraction (built as that script builds it, on its
recorded layer measurements: `attention-fitted` is the fit, `attention-removal` the cheapest attention sub-layers
removed for every token, ...) with `modification train` (the library's `train`), and at each token point given
evaluates a copy of the model in training as kv_curve.py evaluates (perplexity on the three held-out texts at 512 and
at the long context, look-up from far back, the measured KV fraction), a routed model's thresholds first calibrated
again to the fraction on kv_curve's calibration text. The point at 0 tokens is kv_curve.json's unhealed one; the
evaluation settings are that run's, so every number is comparable with its tables.

A run is named `VARIANT@F[:OBJECTIVE][:RECIPE][:DATA]`:
- OBJECTIVE: `distill` (the default: KL to the dense base at T=2, `modification train`'s default) or `lm` (the LM
  loss on the text alone);
- RECIPE: `lora` (default), `routers` or `full`;
- DATA: `repeat` (default: the train parts of the texts, a quarter of the blocks ending in a repeat of an earlier
  passage, `--repeat-share`) or `texts` (the train parts alone); `+chat` adds the base's own chat answers
  (`--chat-data`, made by `modification chat-data`).

    OMP_NUM_THREADS=2 python benchmarks/healing_curve.py --runs attention-fitted@0.9 attention-removal@0.9
    python benchmarks/healing_curve.py --runs attention-fitted@0.9:lm --points 65536   # adds a run to the JSON
    python benchmarks/healing_curve.py --quick --kv-curve /tmp/kv_quick.json          # smoke test (kv_curve --quick)

Finished runs are kept in the JSON (`--out`) and not run again; a run stopped half-way is run again whole.
`benchmarks/healing_curve_report.py` writes the tables into docs/results.md and the plot docs/healing_curve.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kv_curve.py, beside this script
import kv_curve  # noqa: E402

from modification.conversion.atomic import atomic_write_text  # noqa: E402
from modification.conversion.budget import Budget  # noqa: E402
from modification.conversion.calibrate import calibrate_thresholds  # noqa: E402
from modification.conversion.checkpoint import save_checkpoint  # noqa: E402
from modification.conversion.settings import RECIPES, TrainSettings  # noqa: E402
from modification.conversion.train import train  # noqa: E402
from modification.evaluation.benchmark import describe_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {"distill": {}, "lm": {"lm_weight": 1.0, "distill_weight": 0.0}}
DATA = ("repeat", "texts", "repeat+chat", "texts+chat")
BUILT: dict[tuple[str, float], torch.nn.Module] = {}  # (variant, KV fraction) -> the untrained model


@dataclass(frozen=True)
class RunSpec:
    variant: str
    kv_fraction: float
    objective: str = "distill"
    recipe: str = "lora"
    data: str = "repeat"

    @classmethod
    def parse(cls, name: str) -> RunSpec:
        head, *options = name.split(":")
        variant, _, fraction = head.partition("@")
        if variant not in kv_curve.VARIANTS or not fraction:
            raise ValueError(f"run {name!r}: expected VARIANT@F with VARIANT among {', '.join(kv_curve.VARIANTS)}")
        spec = {"variant": variant, "kv_fraction": float(fraction)}
        for option in options:
            key = ("objective" if option in OBJECTIVES else "recipe" if option in RECIPES
                   else "data" if option in DATA else None)
            if key is None:
                raise ValueError(f"run {name!r}: {option!r} is no objective ({', '.join(OBJECTIVES)}), recipe "
                                 f"({', '.join(RECIPES)}) or data ({', '.join(DATA)})")
            spec[key] = option
        return cls(**spec)

    @property
    def name(self) -> str:
        return f"{self.variant}@{self.kv_fraction}:{self.objective}:{self.recipe}:{self.data}"


def evaluation_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model in training as a plain MoD model (LoRA merged into a copy), left untouched."""
    twin = copy.deepcopy(model)
    return (twin.merge_and_unload() if hasattr(twin, "merge_and_unload") else twin).eval()


class CurvePoints(TrainerCallback):
    """Evaluates the model at the optimizer steps that end each token point, and keeps the training time apart
    from the evaluation's."""

    def __init__(self, curve: kv_curve.Curve, spec: RunSpec, steps: list[int], routed: bool, points: list):
        self.curve, self.spec, self.steps, self.routed, self.points = curve, spec, set(steps), routed, points
        self.started, self.evaluating = None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.monotonic()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.steps:
            return
        if state.global_step == max(self.steps):  # the last point: the rest of a longer schedule is not run
            control.should_training_stop = True
        start = time.monotonic()
        twin = evaluation_copy(model)
        if self.routed:
            calibrate_thresholds(twin, self.curve.calib, Budget(kv_fraction=self.spec.kv_fraction), progress=False)
        with torch.no_grad():
            metrics = kv_curve.evaluate(twin, self.curve)
        train_minutes = (start - self.started - self.evaluating) / 60
        self.points.append({"tokens": int(state.num_input_tokens_seen), "steps": state.global_step,
                            "train_minutes": round(train_minutes, 2), **metrics})
        self.evaluating += time.monotonic() - start
        kv_curve.log(f"{self.spec.name} at {state.num_input_tokens_seen:,} tokens ({train_minutes:.1f} min): "
                     f"{metrics}")


def heal_run(curve: kv_curve.Curve, spec: RunSpec, args) -> dict:
    """One run: build the variant, train it to the last token point, evaluating at each."""
    key = (spec.variant, spec.kv_fraction)
    if key not in BUILT:  # runs of one variant start from the same model: built (fitted) once
        BUILT[key] = kv_curve.BUILDERS[spec.variant](curve, spec.kv_fraction)[0]
    model = BUILT[key]  # not changed by training, which loads the checkpoint saved from it
    routed = model.config.routing_plan is not None
    tokens_per_step = args.batch_size * args.seq_len
    steps = [max(1, round(p / tokens_per_step)) for p in args.points]
    schedule_steps = max(steps + [round((args.schedule_tokens or 0) / tokens_per_step)])
    data = list(curve.train_texts)
    if spec.data.endswith("+chat"):
        if not args.chat_data:
            raise ValueError(f"run {spec.name} trains on chat answers: give --chat-data (modification chat-data)")
        data.append(args.chat_data)
    points: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start"
        save_checkpoint(model, start, companions_from=curve.base_dir)
        settings = TrainSettings(
            model=str(start), out=str(Path(tmp) / "healed"), data=data, recipe=spec.recipe, steps=schedule_steps,
            seq_len=args.seq_len, batch_size=args.batch_size, kv_fraction=spec.kv_fraction if routed else None,
            repeat_share=args.repeat_share if spec.data.startswith("repeat") else 0.0, warmup_steps=args.warmup_steps,
            save_steps=10**6, logging_steps=5, progress=False, seed=0, **OBJECTIVES[spec.objective])
        train(settings, callbacks=[CurvePoints(curve, spec, steps, routed, points)])
        recorded = json.loads((Path(tmp) / "healed" / "results.json").read_text())["training"]
    keep = ("recipe", "distill_weight", "distill_temperature", "lm_weight", "learning_rate", "sequence_length",
            "batch_size", "repeat_share", "repeat_tokens", "warmup_steps", "tokens", "minutes", "completed_steps",
            "final_train_loss", "data")
    return {"spec": spec.__dict__, "training": {k: recorded[k] for k in keep if k in recorded},
            "schedule_tokens": schedule_steps * tokens_per_step, "points": points}


def run(args) -> dict:
    recorded_curve = json.loads(Path(args.kv_curve).read_text())
    curve_args = argparse.Namespace(**recorded_curve["settings"])
    curve_args.threads = args.threads
    curve = kv_curve.setup(curve_args)
    kv_curve.use_recorded_measurements(curve, recorded_curve)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "command", "runs")},
        "kv_curve_settings": recorded_curve["settings"], "hardware": describe_device(torch.device("cpu")),
        "base": recorded_curve["base"], "commands": [], "runs": {}}
    differ = {k: (result["settings"].get(k), getattr(args, k)) for k in ("seq_len", "batch_size", "repeat_share")
              if result["settings"].get(k) != getattr(args, k)}
    if differ:
        raise SystemExit(f"{out} was measured with other settings (recorded, asked): {differ}")
    result["commands"].append(args.command)
    result["errors"] = []
    for spec in map(RunSpec.parse, args.runs):
        if spec.name in result["runs"]:
            kv_curve.log(f"{spec.name}: recorded, not run again")
            continue
        start = time.perf_counter()
        try:
            record = heal_run(curve, spec, args)
        except Exception:  # noqa: BLE001 - one failed run must not cost the others
            result["errors"].append(f"{spec.name}: {traceback.format_exc()}")
            kv_curve.log(f"{spec.name} failed:\n{result['errors'][-1]}")
            continue
        untrained = recorded_curve["results"].get(spec.variant, {}).get(str(spec.kv_fraction))
        record["untrained"] = untrained  # the point at 0 tokens
        record["wall_minutes"] = round((time.perf_counter() - start) / 60, 2)
        result["runs"][spec.name] = record
        atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["attention-fitted@0.9", "attention-removal@0.9"],
                        help="VARIANT@F[:OBJECTIVE][:RECIPE][:DATA] (see above)")
    parser.add_argument("--points", type=lambda s: [int(x) for x in s.split(",")], default=[65536, 262144],
                        help="training tokens at which to evaluate; the run ends at the last")
    parser.add_argument("--schedule-tokens", type=int, default=None, help="length of the learning-rate schedule "
                        "(default: the last point); a longer one stops at the last point, so that a short run is "
                        "measured where a long run with that schedule was")
    parser.add_argument("--seq-len", type=int, default=2048, help="training sequence length (look-up needs length)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeat-share", type=float, default=0.25, help="share of blocks ending in a repeat (DATA "
                        "repeat)")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--chat-data", default=None, help="a jsonl of the base's chat answers (modification chat-data)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-curve", default=str(ROOT / "benchmarks/results/kv_curve.json"),
                        help="the kv_curve run whose measurements, settings and unhealed points the curve starts from")
    parser.add_argument("--quick", action="store_true", help="a small run, for a smoke test")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/healing_curve.json"))
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/healing_curve.py", *(sys.argv[1:] if argv is None else argv)])
    if args.quick:
        args.points, args.seq_len, args.runs = [512, 1024], 256, ["attention-removal@0.8", "attention-fitted@0.8"]
    if not Path(args.kv_curve).is_file():
        parser.error(f"--kv-curve: {args.kv_curve} does not exist (run benchmarks/kv_curve.py first)")
    try:
        [RunSpec.parse(r) for r in args.runs]
    except ValueError as err:
        parser.error(str(err))
    return args


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
