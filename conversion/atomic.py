"""Atomic writes: a folder or file is either the old one (or absent) or the new one, never half of either."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success it becomes `out`, on error it is removed.

    Nobody ever sees a half-written checkpoint at `out`: either the old content (or nothing) or the new one.
    """
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # mkdtemp (and some writers) create owner-only files; a checkpoint is meant to be read by others
    tmp.chmod(0o755)
    for path in tmp.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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


def atomic_replace_section(path: Path, name: str, text: str) -> Path:
    """Replace what stands between the lines `<!-- begin: name -->` and `<!-- end: name -->` of `path` with `text`,
    through `atomic_write_text`, and keep the rest: the generated part of a file that people write around it."""
    begin, end = f"<!-- begin: {name} -->", f"<!-- end: {name} -->"
    old = path.read_text(encoding="utf-8")
    if old.count(begin) != 1 or old.count(end) != 1 or old.index(begin) > old.index(end):
        raise ValueError(f"{path} must hold the lines {begin!r} and {end!r} once each, in that order")
    head, rest = old.split(begin, 1)
    tail = rest.split(end, 1)[1]
    return atomic_write_text(path, f"{head}{begin}\n{text.strip()}\n{end}{tail}")
