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
- RECIPE: `lora` (default), `routers` or `full`, or `lora-fixed-routers` (LoRA, the routers kept as fitted);
- DATA: `repeat` (default: the train parts of the texts, a quarter of the blocks ending in a repeat of an earlier
  passage, `--repeat-share`) or `texts` (the train parts alone); `+chat` adds the base's own chat answers
  (`--chat-data`, made by `modification chat-data`).

    OMP_NUM_THREADS=2 python benchmarks/healing_curve.py --runs attention-fitted@0.9 attention-removal@0.9
    python benchmarks/healing_curve.py --runs attention-fitted@0.9:lm --points 65536   # adds a run to the JSON
    python benchmarks/healing_curve.py --quick --kv-curve /tmp/kv_quick.json          # smoke test (kv_curve --quick)

A run is that name and the length of its learning-rate schedule (`--schedule-tokens`, default the last point): the
JSON (`--out`) keys it `NAME/SCHEDULE`. Finished runs are kept there and not run again. A run keeps its checkpoints
(every `--save-steps`) and points in `--work-dir` until it is complete, so that one stopped by `--max-minutes`, Ctrl-C
or a killed process (recorded with `complete: false` and its points so far) continues from its last checkpoint when
the same command runs again; the long run, over several sittings:

    python benchmarks/healing_curve.py --runs attention-fitted@0.9 --points 49152,196608,393216,589824 \
        --max-minutes 90
`benchmarks/healing_curve_report.py` writes the tables into docs/results.md and the plot docs/healing_curve.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME

sys.path.insert(0, str(Path(__file__).resolve().parent))  # kv_curve.py, beside this script
import kv_curve  # noqa: E402

from modification.conversion.atomic import atomic_output_dir, atomic_write_text  # noqa: E402
from modification.conversion.budget import Budget  # noqa: E402
from modification.conversion.calibrate import calibrate_thresholds  # noqa: E402
from modification.conversion.checkpoint import read_mod_config, save_checkpoint  # noqa: E402
from modification.conversion.corpus import cache_dir  # noqa: E402
from modification.conversion.long_runs import last_complete_checkpoint  # noqa: E402
from modification.conversion.settings import RECIPES, TrainSettings  # noqa: E402
from modification.conversion.train import default_checkpoint_dir, train  # noqa: E402
from modification.evaluation.benchmark import describe_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVES = {"distill": {}, "lm": {"lm_weight": 1.0, "distill_weight": 0.0}}
# `modification train`'s recipes, and LoRA with the routers left as the fit made them (their learning rate 0)
RECIPE_SETTINGS = {**{r: {"recipe": r} for r in RECIPES},
                   "lora-fixed-routers": {"recipe": "lora", "router_learning_rate": 0.0}}
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
            key = ("objective" if option in OBJECTIVES else "recipe" if option in RECIPE_SETTINGS
                   else "data" if option in DATA else None)
            if key is None:
                raise ValueError(f"run {name!r}: {option!r} is no objective ({', '.join(OBJECTIVES)}), recipe "
                                 f"({', '.join(RECIPE_SETTINGS)}) or data ({', '.join(DATA)})")
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
    """Evaluates the model at the optimizer steps that end each token point, keeps the training time apart from the
    evaluation's, and writes what it measured to `progress` (the run's work folder) after each point and checkpoint,
    so that a resumed run keeps the points and training minutes of the steps it does not run again."""

    def __init__(self, curve: kv_curve.Curve, spec: RunSpec, steps: list[int], routed: bool, progress: dict,
                 progress_file: Path, minutes_before: float):
        self.curve, self.spec, self.steps, self.routed = curve, spec, set(steps), routed
        self.progress, self.progress_file, self.minutes_before = progress, progress_file, minutes_before
        self.started, self.evaluating = None, 0.0

    def train_minutes(self, now: float) -> float:
        return self.minutes_before + (now - self.started - self.evaluating) / 60

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
        train_minutes = self.train_minutes(start)
        self.progress["points"].append({"tokens": int(state.num_input_tokens_seen), "steps": state.global_step,
                                        "train_minutes": round(train_minutes, 2), **metrics})
        self.evaluating += time.monotonic() - start
        atomic_write_text(self.progress_file, json.dumps(self.progress, indent=1) + "\n")
        kv_curve.log(f"{self.spec.name} at {state.num_input_tokens_seen:,} tokens ({train_minutes:.1f} min): "
                     f"{metrics}")

    def on_save(self, args, state, control, **kwargs):
        self.progress["minutes_at_step"][str(state.global_step)] = round(self.train_minutes(time.monotonic()), 3)
        atomic_write_text(self.progress_file, json.dumps(self.progress, indent=1) + "\n")


def run_key(spec: RunSpec, schedule_tokens: int) -> str:
    """A run is its spec and the length of its learning-rate schedule (a longer run of one spec is another run)."""
    return f"{spec.name}/{schedule_tokens}"


def heal_run(curve: kv_curve.Curve, spec: RunSpec, args) -> dict:
    """One run: build the variant, train it to the last token point, evaluating at each. It works in a folder of
    `args.work_dir` (the model it starts from, checkpoints every `args.save_steps`, the points so far): a run that
    stopped (`--max-minutes`, Ctrl-C, a killed process) continues from its last checkpoint when asked again, and
    its folder is removed once it reaches the last point. The record says `complete` and, if not, where it stands."""
    tokens_per_step = args.batch_size * args.seq_len
    steps = [max(1, round(p / tokens_per_step)) for p in args.points]
    schedule_steps = schedule_tokens(args) // tokens_per_step
    work = Path(args.work_dir) / run_key(spec, schedule_tokens(args)).replace("/", "-")
    start, healed = work / "start", work / "healed"
    progress_file = work / "progress.json"
    if not (start / "config.json").is_file():
        key = (spec.variant, spec.kv_fraction)
        if key not in BUILT:  # runs of one variant start from the same model: built (fitted) once
            BUILT[key] = kv_curve.BUILDERS[spec.variant](curve, spec.kv_fraction)[0]
        with atomic_output_dir(start, overwrite=True) as tmp:  # not changed by training, which loads this copy
            save_checkpoint(BUILT[key], tmp, companions_from=curve.base_dir)
    routed = read_mod_config(start).routing_plan is not None
    checkpoints = default_checkpoint_dir(healed)
    last = last_complete_checkpoint(checkpoints) if checkpoints.is_dir() else None
    progress = {"points": [], "minutes_at_step": {}}
    start_step, minutes_before = 0, 0.0
    if last is not None:
        progress = json.loads(progress_file.read_text())
        start_step = json.loads((Path(last) / TRAINER_STATE_NAME).read_text())["global_step"]
        progress["points"] = [p for p in progress["points"] if p["steps"] <= start_step]  # later ones: run again
        minutes_before = progress["minutes_at_step"].get(str(start_step), 0.0)
        kv_curve.log(f"{spec.name}: resuming from step {start_step} of {schedule_steps} ({last})")
    elif work.exists() and progress_file.is_file():
        progress_file.unlink()  # points of a run that left no checkpoint are measured again
    data = list(curve.train_texts)
    if spec.data.endswith("+chat"):
        if not args.chat_data:
            raise ValueError(f"run {spec.name} trains on chat answers: give --chat-data (modification chat-data)")
        data.append(args.chat_data)
    settings = TrainSettings(
        model=str(start), out=str(healed), overwrite=True, resume=last is not None, data=data,
        steps=schedule_steps, max_minutes=args.max_minutes, seq_len=args.seq_len, batch_size=args.batch_size,
        kv_fraction=spec.kv_fraction if routed else None,
        repeat_share=args.repeat_share if spec.data.startswith("repeat") else 0.0, warmup_steps=args.warmup_steps,
        save_steps=args.save_steps, logging_steps=5, progress=False, seed=0,
        recalibrate=False,  # each point is calibrated on kv_curve's calibration text, as its unhealed point was
        **RECIPE_SETTINGS[spec.recipe], **OBJECTIVES[spec.objective])
    train(settings, callbacks=[CurvePoints(curve, spec, steps, routed, progress, progress_file, minutes_before)])
    recorded = json.loads((healed / "results.json").read_text())["training"]
    keep = ("recipe", "router_learning_rate", "distill_weight", "distill_temperature", "lm_weight", "learning_rate",
            "sequence_length", "batch_size", "repeat_share", "repeat_tokens", "warmup_steps", "tokens",
            "completed_steps", "final_train_loss", "data")
    complete = bool(progress["points"]) and progress["points"][-1]["steps"] == max(steps)
    record = {"spec": spec.__dict__, "training": {k: recorded[k] for k in keep if k in recorded},
              "schedule_tokens": schedule_tokens(args), "points": progress["points"], "complete": complete}
    if complete:
        shutil.rmtree(work)
    else:
        record["stopped_at_step"] = recorded["completed_steps"]
        kv_curve.log(f"{spec.name}: stopped at step {recorded['completed_steps']} of {max(steps)} ("
                     f"{recorded.get('stopped_by')}); the same command continues it from {work}")
    return record


def schedule_tokens(args) -> int:
    """The run's learning-rate schedule in tokens: `--schedule-tokens`, or the last point, in whole steps."""
    tokens_per_step = args.batch_size * args.seq_len
    return tokens_per_step * max([max(1, round(p / tokens_per_step)) for p in args.points]
                                 + [round((args.schedule_tokens or 0) / tokens_per_step)])


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
        key = run_key(spec, schedule_tokens(args))
        before = result["runs"].get(key)
        if before is not None and before.get("complete", True):
            kv_curve.log(f"{key}: recorded, not run again")
            continue
        start = time.perf_counter()
        try:
            record = heal_run(curve, spec, args)
        except Exception:  # noqa: BLE001 - one failed run must not cost the others
            result["errors"].append(f"{key}: {traceback.format_exc()}")
            kv_curve.log(f"{key} failed:\n{result['errors'][-1]}")
            continue
        untrained = recorded_curve["results"].get(spec.variant, {}).get(str(spec.kv_fraction))
        record["untrained"] = untrained  # the point at 0 tokens
        record["wall_minutes"] = round((before or {}).get("wall_minutes", 0.0) + (time.perf_counter() - start) / 60,
                                       2)
        result["runs"][key] = record
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
    parser.add_argument("--max-minutes", type=float, default=None, help="stop each run cleanly after this many "
                        "minutes (evaluation included), recorded as not complete; the same command continues it")
    parser.add_argument("--save-steps", type=int, default=16, help="a checkpoint every N steps (where a stopped run "
                        "continues from)")
    parser.add_argument("--work-dir", default=str(cache_dir() / "healing-curve"), help="where runs keep their "
                        "checkpoints and points until they are complete")
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
