"""`modification demo`: the whole path on one CPU machine, offline, in minutes.

Get a small Llama-architecture base model (trained here on the demo corpus with a BPE tokenizer trained here, cached
for later runs; or `--base`), convert it to MoD, train the routers towards a compute budget, calibrate the thresholds
to that budget, evaluate perplexity and efficiency against the base, and write a Hub-ready checkpoint folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, Trainer, TrainingArguments

from .checkpoint import atomic_output_dir
from .corpus import CORPUS_DESCRIPTION, cache_dir, corpus_files, corpus_splits, train_tokenizer
from .data import PackedBlocks, load_blocks


logger = logging.getLogger(__name__)


@dataclass
class DemoBaseSettings:
    """The demo base model and its pretraining (the cache key: change any field and it is trained anew)."""

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


def pretrain_base(settings: DemoBaseSettings, progress: bool = True) -> Path:
    """Train (or reuse from the cache) the demo base model: tokenizer + LlamaForCausalLM on the training works."""
    folder = cache_dir() / "demo" / f"base-{settings.key()}"
    if (folder / "model.safetensors").is_file():
        return folder
    train_files, _ = corpus_files()
    texts = [f.read_text(encoding="utf-8") for f in train_files]
    tokenizer = train_tokenizer(texts, vocab_size=settings.vocab_size)
    blocks = load_blocks([str(f) for f in train_files], tokenizer, settings.seq_len, progress=progress)
    blocks = torch.cat(blocks)
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
        (tmp / "README.md").write_text(DEMO_BASE_CARD.format(corpus=CORPUS_DESCRIPTION))
        (tmp / "pretraining.json").write_text(json.dumps(
            {"settings": asdict(settings), "log": trainer.state.log_history, "tokens": settings.steps *
             settings.batch_size * settings.seq_len}, indent=1) + "\n")
    return folder


DEMO_REPO_ID = "your-name/shakespeare-llama-mod"  # what the demo's model card names; push with your own repo id
DEMO_BASE_CARD = """---
license: apache-2.0
library_name: transformers
tags: [llama, demo]
---
# MoDification demo base model

A small Llama-architecture model trained from scratch by `modification demo` on {corpus}.
"""


@dataclass
class DemoRunSettings:
    """The MoD part of the demo: what the printed `modification` commands are run with."""

    target: float = 0.75
    recipe: str = "lora"
    steps: int = 120
    seq_len: int = 256
    batch_size: int = 8
    load_loss_coef: float = 1.0
    router_lr: float = 1e-2
    eval_context_lengths: str = "256,1024"
    eval_max_tokens: int = 16384
    bench_lengths: str = "1024,2048"
    bench_repetitions: int = 5


def demo_commands(base_dir: Path, out: Path, work: Path, run: DemoRunSettings) -> list[list[str]]:
    """The `modification` command lines the demo runs, in order (printed so that users can run them too)."""
    train_dir, held_dir = corpus_splits()
    train_data = [str(train_dir)]
    held_data = [str(f) for f in sorted(held_dir.glob("*.txt"))]
    converted, trained = work / "converted", work / "trained"
    return [
        ["convert", "--base", str(base_dir), "--out", str(converted)],
        ["train", "--model", str(converted), "--out", str(trained), "--recipe", run.recipe, "--data", *train_data,
         "--steps", str(run.steps), "--seq-len", str(run.seq_len), "--batch-size", str(run.batch_size),
         "--target", str(run.target), "--load-loss-coef", str(run.load_loss_coef), "--router-lr", str(run.router_lr),
         "--save-steps", str(run.steps), "--checkpoint-dir", str(work / "checkpoints")],
        ["calibrate", "--model", str(trained), "--out", str(out), "--target", str(run.target), "--data", *train_data,
         "--seq-len", str(run.seq_len), "--max-blocks", "64"],
        ["eval", "--model", str(out), "--base", str(base_dir), "--data", *held_data,
         "--context-lengths", run.eval_context_lengths, "--max-tokens", str(run.eval_max_tokens)],
        ["bench", "--model", str(out), "--base", str(base_dir), "--lengths", run.bench_lengths,
         "--data", held_data[0], "--repetitions", str(run.bench_repetitions), "--decode-batch-sizes", "1,4"],
        ["card", "--checkpoint", str(out), "--repo-id", DEMO_REPO_ID, "--overwrite"],
    ]


def run_demo(
    out: str | Path,
    base: str | None = None,
    run: DemoRunSettings | None = None,
    base_settings: DemoBaseSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Run the whole path and return the final results.json; see the module docstring."""
    from .cli import main

    run = run or DemoRunSettings()
    base_settings = base_settings or DemoBaseSettings()
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    corpus_files()  # a clear error before anything runs when the corpus is missing
    start = time.perf_counter()
    print("== MoDification demo ==")
    if base is None:
        cached = (cache_dir() / "demo" / f"base-{base_settings.key()}" / "model.safetensors").is_file()
        print(f"[base] {'reusing the cached' if cached else 'training a'} demo base model "
              f"({base_settings.num_layers} layers, hidden {base_settings.hidden_size}, BPE vocab "
              f"{base_settings.vocab_size}) on the demo corpus")
        base_dir = pretrain_base(base_settings, progress=progress)
    else:
        base_dir = Path(base)
    print(f"[base] {base_dir}  ({time.perf_counter() - start:.0f} s)")
    work = out.with_name(out.name + "-work")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if out.exists():
        shutil.rmtree(out)
    for argv in demo_commands(base_dir, out, work, run):
        print(f"\n$ modification {' '.join(argv)}")
        code = main(argv + (["--no-progress"] if not progress and argv[0] in ("eval", "bench") else []))
        if code:
            raise RuntimeError(f"`modification {argv[0]}` failed (exit code {code})")
        print(f"   ({time.perf_counter() - start:.0f} s)")
    shutil.rmtree(work, ignore_errors=True)
    results = json.loads((out / "results.json").read_text())
    print_summary(results)
    print(f"\nHub-ready checkpoint: {out}  (total {time.perf_counter() - start:.0f} s)")
    return results


def summary_rows(results: dict) -> list[tuple[str, str]]:
    """The demo's closing table, read from results.json."""
    eff = results.get("efficiency", {})
    rows = [("executed fraction (held-out text)", f"{eff['executed_fraction']:.3f}")]
    if eff.get("kv_ratio") is not None:
        rows.append(("KV-cache memory, MoD / base", f"{eff['kv_ratio']:.3f}"))
    for row in eff.get("latency", []):
        rows.append((f"prefill time @{row['context_length']}, MoD / base",
                     f"{row['prefill_latency_ratio']:.3f} (ideal {row['ideal_latency_ratio']:.3f})"))
    for row in results.get("quality", {}).get("perplexity", []):
        base = f"{row['base']:.2f}" if row.get("base") is not None else "n/a"
        rows.append((f"perplexity @{row['context_length']} {row['dataset']}: base / MoD", f"{base} / {row['mod']:.2f}"))
    return rows


def print_summary(results: dict) -> None:
    rows = summary_rows(results)
    width = max(len(k) for k, _ in rows)
    print("\n" + "-" * (width + 30))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("-" * (width + 30))
