"""Paths of this machine kept out of published checkpoints.

A checkpoint folder is published as it is (`modification push`), so everything written into it is read by strangers:
an absolute path there shows the user's home folder and cache layout, and names nothing that exists elsewhere. The
writers (`checkpoint.save_checkpoint`, `results.update_results`) pass every path through `public_name` or
`public_command`; `local_path_problems` is the check `push` runs on the files it is about to upload.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath
from typing import Any

# A path component: no slash, no line break, no whitespace at either end (so two BPE tokens such as "/ab /cd", or a
# sentence with slashes, are not taken for a path, while "/Users/Jane Doe/model" is).
_PART = r"[^/\s](?:[^/\n]*[^/\s])?"
_WINDOWS_PART = r"[^\\/\s](?:[^\\/\n]*[^\\/\s])?"
# Two components at least: "/" or "/data" alone tell nothing about a machine.
_POSIX_PATH = re.compile(rf"/{_PART}(?:/{_PART})+/?")
_HOME_PATH = re.compile(rf"~/{_PART}(?:/{_PART})*/?")
_WINDOWS_PATH = re.compile(rf"[A-Za-z]:[\\/]{_WINDOWS_PART}(?:[\\/]{_WINDOWS_PART})*[\\/]?")
# `models--org--name/snapshots/<sha>/...` in a Hugging Face Hub cache (datasets and spaces are laid out alike).
_HUB_CACHE_REPO = re.compile(r"(?:models|datasets|spaces)--(.+)")
# What `public_command` writes for a path that has no public name: visibly not a path to run as it is.
LOCAL_PLACEHOLDER = "<local>"
# Files that are never scanned: weights and other binary formats (not text, and large).
BINARY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".model", ".msgpack", ".h5", ".onnx",
                   ".png", ".jpg")
# The base's vocabulary, copied byte for byte: learned token strings such as "/usr/bin" look like paths but are not.
VOCABULARY_FILES = ("vocab.json", "merges.txt")
VOCABULARY_FIELDS = {"tokenizer.json": "model"}


def is_local_path(value: str) -> bool:
    """True for an absolute path of some machine: POSIX `/a/b...` (two components at least), `~/...`, `C:\\...`."""
    return any(p.fullmatch(value) for p in (_POSIX_PATH, _HOME_PATH, _WINDOWS_PATH))


def _relative_to(path: Path, root: Path) -> Path | None:
    """`path` relative to `root` when it lies below it, else None. Compared as written first (a linked file keeps
    the name it was given), then with links resolved (os.getcwd() is always resolved)."""
    for candidate, base in ((path, Path(os.path.abspath(root))), (path.resolve(), root.resolve())):
        try:
            return candidate.relative_to(base)
        except ValueError:
            continue
    return None


def _hub_cache_id(path: Path) -> str | None:
    """`org/name` for a path inside a Hub cache snapshot (repo names never hold "--", so the split is exact)."""
    parts = path.parts
    for i, part in enumerate(parts[:-2]):
        match = _HUB_CACHE_REPO.fullmatch(part)
        if match and parts[i + 1] == "snapshots":
            return match.group(1).replace("--", "/")
    return None


def _fetched_base(path: Path) -> str | None:
    """The registry name when `path` is the cached folder of a base fetched with `modification fetch-base`."""
    from .bases import KNOWN_BASES, bases_dir

    relative = _relative_to(path, bases_dir())
    if relative is not None and len(relative.parts) == 1 and relative.parts[0] in KNOWN_BASES:
        return relative.parts[0]
    return None


def _public(value: str, in_command: bool) -> str:
    """`public_name`, or with `in_command` the form a command line takes (see `public_command`)."""
    if not is_local_path(value):
        return value  # Hub ids, relative paths, URLs, names
    if _WINDOWS_PATH.fullmatch(value):
        name = PureWindowsPath(value).name
        return f"{LOCAL_PLACEHOLDER}/{name}" if in_command else name
    path = Path(os.path.abspath(os.path.expanduser(value)))
    hub_id = _hub_cache_id(path)
    if hub_id is not None:
        return hub_id
    registry_name = _fetched_base(path)
    if registry_name is not None:
        from .bases import KNOWN_BASES

        # A command takes the registry name: it names the same (dequantised) weights, the Hub id the original ones.
        return registry_name if in_command else KNOWN_BASES[registry_name].hub_id
    relative = _relative_to(path, Path.cwd())
    if relative is not None:  # "./" so that "model/base" is never taken for the Hub id of a model "base"
        return "." if relative == Path() else f"./{relative}"
    return f"{LOCAL_PLACEHOLDER}/{path.name}" if in_command else path.name


def public_name(value: str) -> str:
    """What a published file says instead of the local path `value`: a Hub cache snapshot's `org/name`, a fetched
    base's Hub id, a path below the working directory relative to it (`./a/b`), any other absolute path its last
    component. Hub ids, relative paths and anything that is not an absolute path come back unchanged."""
    return _public(value, in_command=False)


def data_names(sources: list[str]) -> list[str]:
    """How configs and results name data sources: a local file or folder by its name (which text, not where it lies
    on this machine), a dataset id as it is."""
    return [Path(s).name if Path(s).exists() else public_name(s) for s in sources]


def public_strings(value: Any) -> Any:
    """A JSON-like `value` (dicts, lists, strings, numbers) with every string passed through `public_name`."""
    if isinstance(value, str):
        return public_name(value)
    if isinstance(value, dict):
        return {key: public_strings(item) for key, item in value.items()}
    if isinstance(value, list):
        return [public_strings(item) for item in value]
    return value


def public_command(command: str) -> str:
    """A recorded command line with every absolute-path argument (also `--flag=/path`) made public: relative when
    below the working directory, a Hub id for a Hub cache snapshot, the registry name for a fetched base (so the
    command still runs), else `<local>/NAME`, a placeholder for a path only this machine has."""
    try:
        words = shlex.split(command)
    except ValueError:  # an unbalanced quote: split on spaces, quotes dropped, rather than let a path through
        words = [word.strip("'\"") for word in command.split()]
    public = []
    for word in words:
        flag, equals, value = word.partition("=")
        if equals and flag.startswith("-"):
            public.append(f"{flag}={_public(value, in_command=True)}")
        else:
            public.append(_public(word, in_command=True))
    return shlex.join(public)


# ---------------------------------------------------------------------------------------------------------------
# The check before an upload


def _local_roots() -> list[str]:
    """The folders of this machine whose names must not be published (as written and with links resolved)."""
    from huggingface_hub import constants

    from .corpus import cache_dir

    roots = set()
    for root in (Path.home(), Path.cwd(), tempfile.gettempdir(), constants.HF_HOME, constants.HF_HUB_CACHE,
                 cache_dir()):
        for form in (os.path.abspath(root), os.path.realpath(root)):
            if form.rstrip("/"):  # a home or cwd of "/" would match every path
                roots.add(form.rstrip("/"))
    return sorted(roots, key=len, reverse=True)


def _local_text_pattern() -> re.Pattern:
    """Where a line of text names a local folder: one of `_local_roots()`, or a /root/, /home/, /tmp/ or /Users/
    path. Not inside a URL or a longer path (nothing path-like right before it)."""
    roots = "|".join(re.escape(root) for root in _local_roots())
    return re.compile(rf"(?<![\w.~/:-])(?:(?:{roots})(?![\w.-])|/(?:root|home|tmp|Users)/[^\s/])")


def _json_strings(value: Any, field: str = "") -> Iterator[tuple[str, str]]:
    """(field path, string) for every string value in a JSON document: `calibration.data[0]`."""
    if isinstance(value, str):
        yield field or "(the whole document)", value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _json_strings(item, f"{field}.{key}" if field else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _json_strings(item, f"{field}[{i}]")


def _short(text: str, limit: int = 160) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def local_path_problems(files: dict[str, bytes | Path]) -> list[str]:
    """Every place in the files of an upload (repo path -> local file or bytes) that names a path of this machine:
    `config.json: calibration.data[0] = '/root/...'` for JSON (each string value: an absolute path, or text that
    names a local folder), `README.md: line 12: '...'` for other text. Binary files and vocabularies are skipped."""
    pattern = _local_text_pattern()
    problems = []
    for name, source in files.items():
        if name.endswith(BINARY_SUFFIXES) or name in VOCABULARY_FILES:
            continue
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if "\0" in text:
            continue  # binary after all
        if name.endswith(".json"):
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                pass  # scanned as text below
            else:
                skip = VOCABULARY_FIELDS.get(name)
                if isinstance(document, dict) and skip:
                    document = {k: v for k, v in document.items() if k != skip}
                problems += [f"{name}: {field} = {_short(value)}" for field, value in _json_strings(document)
                             if is_local_path(value) or pattern.search(value)]
                continue
        problems += [f"{name}: line {number}: {_short(line.strip())}"
                     for number, line in enumerate(text.splitlines(), 1) if pattern.search(line)]
    return problems
