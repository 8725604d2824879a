"""Loading what eval, bench, show-routing and the chat comparison measure: the device and dtype, the MoD checkpoint
next to its base model, the tokenizer, and where the results of a checkpoint go."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from modification.conversion.checkpoint import (
    CheckpointError,
    fastest_attn_implementation,
    load_mod_model,
    read_mod_config,
)

logger = logging.getLogger(__name__)


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (what MoD's varlen attention kernels take), float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_models(
    model: str, base: str | None, device: torch.device, dtype: torch.dtype, use_base: bool = True
) -> tuple[torch.nn.Module, Path, torch.nn.Module | None, str | None]:
    """The MoD model (and its folder) and the base model (and the name it was loaded from, or None), in eval mode.

    Without `base`, the base is the checkpoint's `base_model_name_or_path` if that resolves on this machine (a folder,
    or a Hub id already in the local cache); otherwise the MoD model is evaluated alone.
    """
    from modification.conversion.bases import base_path

    mod, folder = load_mod_model(model, dtype=dtype)
    mod = mod.to(device).eval()
    mod.set_attn_implementation(fastest_attn_implementation(device))
    base_name = base_path(base) if use_base and base else None  # a fetched registry name -> its cached folder
    if use_base and base_name is None:
        base_name = local_base_model(mod.config.base_model_name_or_path)
        if base_name is None:
            logger.warning("no --base given and the checkpoint's base model (%s) is not available locally: "
                           "evaluating the MoD model alone", mod.config.base_model_name_or_path)
    base_model = None
    if base_name is not None:
        from transformers import AutoModelForCausalLM

        try:
            base_model = AutoModelForCausalLM.from_pretrained(base_name, dtype=dtype)
        except OSError as err:
            raise CheckpointError(f"could not load the base model {base_name!r}: {err}") from err
        base_model = base_model.to(device).eval()
        if base_model.config.vocab_size != mod.config.vocab_size:
            raise ValueError(
                f"the base model {base_name} has vocab_size {base_model.config.vocab_size} but the MoD model has "
                f"{mod.config.vocab_size}: they cannot be compared on the same tokens"
            )
    return mod, folder, base_model, base_name


def local_base_model(name: str | None) -> str | None:
    """`name` if it is a local folder or a Hub id whose snapshot is in the local cache; else the cached folder of a
    base fetched with `modification fetch-base` whose Hub id (or registry name) is `name`; else None (never
    downloads)."""
    if not name:
        return None
    if Path(name).is_dir():
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id
        pass
    from modification.conversion.bases import KNOWN_BASES, BaseNotFetchedError, base_path

    for registry_name, known in KNOWN_BASES.items():
        if name in (registry_name, known.hub_id):
            try:
                return base_path(registry_name)
            except BaseNotFetchedError:
                return None
    return None


def load_tokenizer(folder: Path, base_name: str | None = None):
    """The checkpoint's tokenizer, else the base's; a clear error when neither has one."""
    from transformers import AutoTokenizer


    # Our config is passed in so that AutoTokenizer does not go through the folder's custom code (auto_map) for it.
    sources = [(str(folder), {"config": read_mod_config(folder)})] + ([(base_name, {})] if base_name else [])
    for source, kwargs in sources:
        try:
            return AutoTokenizer.from_pretrained(source, **kwargs)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    raise ValueError(f"no tokenizer found in {folder}" + (f" nor in {base_name}" if base_name else ""))


def default_output_dir(model: str) -> Path:
    """Where results go without --out: the checkpoint folder when it is a local folder outside the Hub cache, else
    `./<org--name>` (never write into the Hub cache)."""
    if Path(model).is_dir() and "snapshots" not in Path(model).resolve().parts:
        return Path(model)
    return Path.cwd() / model.strip("/").replace("/", "--")
