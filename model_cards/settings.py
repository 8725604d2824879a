"""What `card` and `push` run with, declared and checked as `conversion/settings.py` declares the conversion steps
(see `conversion/steps.py`). `push` renders the card when the checkpoint has none, so both take the card's inputs
(`base_model`, `license`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from modification.conversion.steps import StepSettings, setting


def checkpoint_setting() -> Any:
    return setting(None, "checkpoint folder or Hub id", required=True)


def base_model_setting() -> Any:
    return setting(None, "the base model's Hub id for the card (default: from results.json or config.json)")


def license_setting() -> Any:
    return setting(None, "licence id for the card (default: the base model's card; 'other (unknown)' with a warning)")


@dataclass
class CardSettings(StepSettings):
    """What `modification card` writes (see `model_cards/card.py`)."""

    step: ClassVar[str] = "card"

    checkpoint: str | None = checkpoint_setting()
    repo_id: str | None = setting(None, "the Hub repo the card is for (org/name)", required=True)
    out: str | None = setting(None, "where to write it (default: README.md in the checkpoint folder; - for stdout)")
    overwrite: bool = setting(False, "replace an existing card")
    base_model: str | None = base_model_setting()
    license: str | None = license_setting()


@dataclass
class PushSettings(StepSettings):
    """What `modification push` verifies and uploads (see `push_scripts/push.py`)."""

    step: ClassVar[str] = "push"

    checkpoint: str | None = checkpoint_setting()
    repo_id: str | None = setting(None, "target repo (org/name); created if missing", required=True)
    private: bool = setting(False, "create the repo private (an existing repo keeps its visibility)")
    revision: str | None = setting(None, "branch to commit to (created if missing; default main)")
    create_pr: bool = setting(False, "open a pull request instead of committing to the branch")
    dry_run: bool = setting(False, "verify and print exactly what would be uploaded; send nothing")
    delete_missing: bool = setting(False, "also delete remote files that the checkpoint does not have (default: "
                                          "never delete)")
    new_card: bool = setting(False, "render a fresh card instead of using the checkpoint's README.md")
    commit_message: str | None = setting(None, "the commit message (default: the file count and this version)")
    allow_local_paths: bool = setting(False, "publish files that name paths of this machine (refused by default)")
    base_model: str | None = base_model_setting()
    license: str | None = license_setting()
