"""`modification push`: verify a MoD checkpoint folder, then publish it to the Hub in one commit.

Verification runs before anything touches the network: the folder must be a MoD checkpoint whose modeling files are
this package's (present and byte-identical), whose config.json has `auto_map`, that loads offline through
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` with the checkpoint's own code, and whose model card
(README.md, rendered now when the folder has none) has valid metadata and exactly the numbers of its results.json,
and whose files name no path of this machine (home folder, caches, temp folders; `allow_local_paths` overrides).
Only checkpoint files are uploaded (weights, config, code, tokenizer, card, results); anything else in the folder is
listed as skipped. Remote files are never deleted unless `delete_missing` is asked for.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from modification.conversion.checkpoint import (
    AUTO_MAP,
    CODE_FILES,
    HUB_ID,
    MODELING_DIR,
    TOKENIZER_FILES,
    CheckpointError,
    read_mod_config,
    resolve_checkpoint,
    stale_code_files,
)
from modification.conversion.local_paths import local_path_problems
from modification.conversion.results import RESULTS_FILENAME
from modification.model_cards.card import CARD_FILENAME, card_problems, render_card
from modification.model_cards.settings import PushSettings

logger = logging.getLogger(__name__)

# Files of a checkpoint that are published; anything else in the folder (optimizer state, logs) is not.
UPLOAD_NAMES = ("config.json", "generation_config.json", CARD_FILENAME, RESULTS_FILENAME, *CODE_FILES, *TOKENIZER_FILES)
UPLOAD_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "LICENSE*", "NOTICE*", "USE_POLICY*")
# The Hub rejects single files above 50 GB; save_pretrained shards far below that by default.
MAX_FILE_BYTES = 50 * 1000**3
# Files on the Hub that a checkpoint folder never has and `delete_missing` must keep.
KEEP_REMOTE = (".gitattributes",)


@dataclass
class UploadPlan:
    """What a push sends: repo paths mapped to a local file or to bytes rendered at push time."""

    folder: Path
    repo_id: str
    files: dict[str, Path | bytes]
    rendered: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def size(self, path_in_repo: str) -> int:
        source = self.files[path_in_repo]
        return len(source) if isinstance(source, bytes) else source.stat().st_size


def is_checkpoint_file(name: str) -> bool:
    return name in UPLOAD_NAMES or any(fnmatch.fnmatch(name, pattern) for pattern in UPLOAD_PATTERNS)


def plan_upload(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    base_model: str | None = None,
    license: str | None = None,
    new_card: bool = False,
) -> UploadPlan:
    """The files a push of `folder` to `repo_id` uploads; the card is rendered when the folder has none (or when
    `new_card` asks for a fresh one in place of the folder's README.md)."""
    if not HUB_ID.match(repo_id):
        raise ValueError(f"--repo-id must look like org/name, got {repo_id!r}")
    folder = Path(folder)
    files: dict[str, Path | bytes] = {}
    skipped = []
    for path in sorted(folder.iterdir()):
        if path.is_file() and is_checkpoint_file(path.name):
            files[path.name] = path
        elif not path.name.startswith("."):  # hidden entries (.cache, .git) are never part of a checkpoint
            skipped.append(path.name + ("/" if path.is_dir() else ""))
    rendered = []
    if CARD_FILENAME not in files or new_card:
        card = render_card(folder, repo_id, base_model=base_model, license=license)
        files[CARD_FILENAME] = str(card).encode("utf-8")
        rendered.append(CARD_FILENAME)
    elif base_model or license:
        logger.warning("%s has its own %s: --base-model/--license are not used", folder, CARD_FILENAME)
    return UploadPlan(folder=folder, repo_id=repo_id, files=dict(sorted(files.items())), rendered=rendered,
                      skipped=skipped)


def _card_text(plan: UploadPlan) -> str:
    source = plan.files[CARD_FILENAME]
    return source.decode("utf-8") if isinstance(source, bytes) else source.read_text(encoding="utf-8")


def file_problems(plan: UploadPlan) -> list[str]:
    """Everything wrong with the folder that can be seen without loading the model."""
    from huggingface_hub import ModelCard

    folder = plan.folder
    read_mod_config(folder)  # not a MoD checkpoint at all: one clear error is enough
    problems = []
    for name in stale_code_files(folder):
        if (folder / name).is_file():
            problems.append(
                f"{name} differs from this package's {MODELING_DIR / name}: the checkpoint was written by another "
                "version of modification; convert again (or copy the current modeling files after checking them)"
            )
        else:
            problems.append(f"modeling file {name} is missing: without it trust_remote_code cannot load the model")
    auto_map = read_config_json(folder).get("auto_map")
    if not auto_map:
        problems.append("config.json has no auto_map: transformers would not find the model code")
    elif any(auto_map.get(k) != v for k, v in AUTO_MAP.items()):
        problems.append(f"config.json auto_map is {auto_map}, expected {AUTO_MAP}")
    if not any(name.endswith(".safetensors") for name in plan.files):
        problems.append("no *.safetensors weights (the Hub release ships safetensors only)")
    if "tokenizer_config.json" not in plan.files:
        problems.append("no tokenizer (tokenizer_config.json missing): the card's usage snippet would fail")
    for name in plan.files:
        if plan.size(name) > MAX_FILE_BYTES:
            problems.append(f"{name} is larger than the Hub's 50 GB file limit; save with smaller shards")
    try:
        card = ModelCard(_card_text(plan))
    except ValueError as err:
        problems.append(f"{CARD_FILENAME}: metadata does not parse: {err}")
    else:
        problems.extend(card_problems(card, folder, plan.repo_id))
    return problems


def read_config_json(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def load_check(folder: Path) -> str:
    """Load the folder as a user would (offline, checkpoint's own code) and generate two tokens; returns the class."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            folder, trust_remote_code=True, local_files_only=True, output_loading_info=True, dtype="auto"
        )
        AutoTokenizer.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    except Exception as err:  # any failure here is what a user downloading the repo would meet
        raise CheckpointError(
            f"{folder} does not load with AutoModelForCausalLM(trust_remote_code=True): {err}"
        ) from err
    cls = type(model)
    if not cls.__module__.startswith("transformers_modules"):
        raise CheckpointError(f"{folder} loaded {cls.__module__}.{cls.__name__}, not the checkpoint's own code")
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise CheckpointError(f"the weights in {folder} do not match its config: {bad}")
    model.eval()
    start = model.config.bos_token_id if isinstance(model.config.bos_token_id, int) else 0
    ids = torch.tensor([[start, start]], device=model.device)
    with torch.no_grad():
        logits = model(ids).logits
        if not torch.isfinite(logits).all():
            raise CheckpointError(f"{folder}: the model's logits are not finite (NaN or inf weights?)")
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=start)
    return f"{cls.__module__}.{cls.__name__}"


def refuse_local_paths(plan: UploadPlan) -> None:
    """Raise a `CheckpointError` naming each file and field of the upload that holds a path of this machine."""
    found = local_path_problems(plan.files)
    if found:
        raise CheckpointError(
            f"{plan.folder} would publish paths of this machine (they show your home folder and cache layout and "
            "mean nothing elsewhere):\n" + "\n".join(f"  - {p}" for p in found) + "\n"
            "Write the checkpoint again with this version of modification (convert, fit, calibrate and eval write "
            "public names), or edit those fields, then push again; --allow-local-paths publishes them as they are."
        )


def verify_checkpoint(plan: UploadPlan, *, allow_local_paths: bool = False) -> str:
    """Raise a `CheckpointError` listing every problem; returns the class the checkpoint loads as."""
    problems = file_problems(plan)
    if problems:
        raise CheckpointError(
            f"{plan.folder} is not ready to publish:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    if not allow_local_paths:
        refuse_local_paths(plan)
    return load_check(plan.folder)


def format_plan(plan: UploadPlan, *, revision: str | None, create_pr: bool, delete_missing: bool) -> str:
    """The dry-run listing: every file the commit adds, with its size in bytes."""
    target = f"{plan.repo_id} (revision {revision or 'main'}{', as a pull request' if create_pr else ''})"
    lines = [f"would push {plan.folder} to {target} in one commit, adding {len(plan.files)} files:"]
    width = max(len(name) for name in plan.files)
    for name in plan.files:
        note = "  (model card rendered now)" if name in plan.rendered else ""
        lines.append(f"  {name:<{width}}  {plan.size(name):>15,} bytes{note}")
    lines.append(f"total: {sum(plan.size(n) for n in plan.files):,} bytes")
    if plan.skipped:
        lines.append(f"not uploaded (not checkpoint files): {', '.join(plan.skipped)}")
    if delete_missing:
        lines.append("remote files not listed above (except .gitattributes) are deleted in the same commit")
    else:
        lines.append("no remote file is deleted")
    return "\n".join(lines)


def require_token() -> str:
    """The Hub token from the usual places (HF_TOKEN, `hf auth login`), or a clear error."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ValueError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access to the repo)"
        )
    return token


def push_checkpoint(settings: PushSettings) -> tuple[UploadPlan, object | None]:
    """Verify and upload `settings.checkpoint` (folder or Hub id) to `settings.repo_id`; returns the plan and the
    `CommitInfo`.

    With `dry_run` everything is verified and nothing is sent (no token needed); the `CommitInfo` is None.
    `allow_local_paths` publishes files that name paths of this machine instead of refusing them.
    """
    repo_id, revision, create_pr = settings.repo_id, settings.revision, settings.create_pr
    token = None if settings.dry_run else require_token()  # fail before the slow checks
    folder = resolve_checkpoint(settings.checkpoint)
    plan = plan_upload(folder, repo_id, base_model=settings.base_model, license=settings.license,
                       new_card=settings.new_card)
    verify_checkpoint(plan, allow_local_paths=settings.allow_local_paths)
    if settings.dry_run:
        return plan, None

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=True if settings.private else None, exist_ok=True)
    if revision and revision != "main" and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations: list = []
    for name, source in plan.files.items():
        data = source if isinstance(source, bytes) else str(source)
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=data))
    if settings.delete_missing:
        remote = api.list_repo_files(repo_id, revision=revision)
        operations += [CommitOperationDelete(path_in_repo=name) for name in sorted(remote)
                       if name not in plan.files and name not in KEEP_REMOTE]
    try:
        ours = version("modification")
    except PackageNotFoundError:
        ours = "dev"
    message = settings.commit_message or f"Upload MoD checkpoint ({len(plan.files)} files, modification {ours})"
    info = api.create_commit(
        repo_id,
        operations,
        commit_message=message,
        revision=revision,
        create_pr=create_pr,
    )
    return plan, info
