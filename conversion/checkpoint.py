"""Checkpoint folders: atomic writes, the custom-code files every MoD checkpoint carries, and loading with checks."""

from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError

from modification.modeling import MoDConfig, MoDForCausalLM
from modification.modeling.modeling_mod import torch_varlen_available

from .local_paths import public_name, public_strings

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
# The files copied into every checkpoint (they import only torch, transformers and each other).
CODE_FILES = ("configuration_mod.py", "modeling_mod.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mod.MoDConfig",
    "AutoModel": "modeling_mod.MoDModel",
    "AutoModelForCausalLM": "modeling_mod.MoDForCausalLM",
}


# Files that travel with the weights byte for byte (re-serialising a tokenizer can change it): the tokenizer, and the
# licence files some base licences (Llama's) require to ship with derivatives.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "USE_POLICY.md", "NOTICE", "NOTICE.txt")


class CheckpointError(ValueError):
    """A folder or Hub repo that is not a usable MoD checkpoint."""


# A Hub repo id, `org/name`: the one definition every module uses.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """True for `org/name` repo ids that are not an existing local path."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def card_license_fields(meta: dict) -> dict | None:
    """The licence fields (`license`, `license_name`, `license_link`) of a model card's metadata, or None."""
    if not meta.get("license"):
        return None
    return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}


def card_license(path: str | os.PathLike) -> dict | None:
    """The licence fields of the model card (README.md) at `path`, or None when it has none or does not parse."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(path, ignore_metadata_errors=True)
    except (OSError, ValueError):
        return None
    return card_license_fields(card.data.to_dict())


def stale_code_files(folder: str | os.PathLike) -> list[str]:
    """The modeling files missing from `folder` or differing from this package's copy."""
    folder = Path(folder)
    return [
        name
        for name in CODE_FILES
        if not (folder / name).is_file() or not filecmp.cmp(folder / name, MODELING_DIR / name, shallow=False)
    ]


def write_code_files(folder: str | os.PathLike) -> None:
    """Copy this package's modeling files into `folder` and make config.json's `auto_map` point at them."""
    folder = Path(folder)
    for name in CODE_FILES:
        shutil.copyfile(MODELING_DIR / name, folder / name)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = dict(AUTO_MAP)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_companion_files(source: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and licence files of folder `source` into `dest` byte for byte; returns their names."""
    source, dest = Path(source), Path(dest)
    copied = []
    for name in TOKENIZER_FILES + LICENSE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    return copied


def save_checkpoint(
    model: MoDForCausalLM, folder: str | os.PathLike, companions_from: str | os.PathLike | None = None
) -> list[str]:
    """Save weights (safetensors), config with `auto_map` and the modeling files into `folder`, plus the tokenizer and
    licence files of the folder `companions_from` (the model this one was made from); returns the names copied.

    A checkpoint folder is what gets published, so the config's paths of this machine (the base folder, the data of
    a calibration or fit) are replaced by their public names first, in `model.config` too (`local_paths`)."""
    config = model.config
    if config.base_model_name_or_path:
        config.base_model_name_or_path = public_name(config.base_model_name_or_path)
    if config.calibration:
        config.calibration = public_strings(config.calibration)
    model.save_pretrained(folder)
    write_code_files(folder)
    return copy_companion_files(companions_from, folder) if companions_from is not None else []


def resolve_checkpoint(name_or_path: str, revision: str | None = None) -> Path:
    """A local folder for `name_or_path`: the folder itself, or the Hub snapshot (from the cache when offline)."""
    path = Path(name_or_path)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{name_or_path} is a file, not a checkpoint folder")
        return path
    if not is_hub_id(name_or_path):
        raise CheckpointError(f"{name_or_path} is neither an existing folder nor a Hub repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name_or_path, revision=revision))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"{name_or_path} is not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE or no network)"
        ) from err
    except HfHubHTTPError as err:
        raise CheckpointError(f"could not download {name_or_path} from the Hub: {err}") from err


def read_mod_config(folder: str | os.PathLike) -> MoDConfig:
    """Read and validate the config of a MoD checkpoint folder, with a clear error for anything else."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no config.json: not a model checkpoint")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    if raw.get("model_type") != MoDConfig.model_type:
        raise CheckpointError(
            f"{folder} holds a {raw.get('model_type')!r} model, not a MoD checkpoint (model_type "
            f"{MoDConfig.model_type!r}); convert it first with `modification convert --base {folder} --out <dir>`"
        )
    try:
        return MoDConfig.from_pretrained(folder)
    except (ValueError, StrictDataclassError) as err:
        raise CheckpointError(f"{config_path}: {err}") from err


def load_mod_model(
    name_or_path: str, dtype: torch.dtype | str = "auto", revision: str | None = None, **kwargs
) -> tuple[MoDForCausalLM, Path]:
    """Load a MoD checkpoint (folder or Hub id) with this package's model classes; returns the model and its folder.

    Weights that do not match the config (a corrupt or truncated checkpoint) raise a `CheckpointError`.
    """
    folder = resolve_checkpoint(name_or_path, revision)
    config = read_mod_config(folder)
    weight_files = list(folder.glob("*.safetensors")) + list(folder.glob("*.bin"))
    if not weight_files:
        raise CheckpointError(f"{folder} has no weights (*.safetensors)")
    try:
        model, info = MoDForCausalLM.from_pretrained(
            folder, config=config, dtype=dtype, output_loading_info=True, **kwargs
        )
    except Exception as err:  # safetensors / torch raise many types for damaged files
        raise CheckpointError(f"could not load the weights in {folder}: {err}") from err
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"the weights in {folder} do not match its config: {problems}")
    return model, folder


def fastest_attn_implementation(device: torch.device) -> str:
    """The fastest attention a MoD model can run on `device`, for the commands to choose once after loading:
    flash-attn's varlen kernel when installed, else PyTorch's (`torch_varlen`), on CUDA; the exact path elsewhere."""
    if device.type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "torch_varlen" if torch_varlen_available() else "sdpa"
    return "flash_attention_2"
