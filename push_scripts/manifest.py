"""The release manifest (`releases.yaml`): reading and checking it, and planning each member's steps as settings
objects (`plan_release`). Running them is `release.py`'s.

A member's section of a step holds that step's settings: its keys are the fields of the step's settings dataclass
(`STEP_SETTINGS`), the flags of `modification <step>` with underscores. The release chains the steps on top of them:
each step reads what the step before it wrote under `<work_dir>/<member>/` (`convert` gets `base` and `out`;
`fit`, `train` and `calibrate` `model` and `out`; `eval` and `bench` `model` and `base`; `card` and `push`
`checkpoint`, `repo_id`, `base_model` and `license`), and a section may set those keys too. Every value is checked by
the settings dataclass, and a mistake names the member, the step and the key (`members.x.fit.seq_len: must be an
integer, got 'long'`).

Data can name the project's offline texts symbolically: `texts:<kind>/<split>` (kind shakespeare, kjv or gcide; split
train or held_out, see `conversion/texts.py`). They become `<work_dir>/<member>/texts/<kind>-<split>.txt`, which the
release links to the prepared texts before the steps run, so results and cards name the text `<kind>-<split>.txt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modification.conversion.checkpoint import is_hub_id
from modification.conversion.settings import CalibrateSettings, ConvertSettings, FitSettings, TrainSettings
from modification.conversion.steps import StepSettings
from modification.evaluation.settings import BenchSettings, EvalSettings
from modification.model_cards.settings import CardSettings, PushSettings

DEFAULT_MANIFEST = Path(__file__).resolve().parent / "releases.yaml"
STEP_SETTINGS = {"convert": ConvertSettings, "fit": FitSettings, "train": TrainSettings,
                 "calibrate": CalibrateSettings, "eval": EvalSettings, "bench": BenchSettings, "card": CardSettings,
                 "push": PushSettings}
STEPS = tuple(STEP_SETTINGS)
# The steps that write a checkpoint, and the folder each writes under the member's folder.
CHECKPOINT_FOLDERS = {"convert": "converted", "fit": "fitted", "train": "trained", "calibrate": "calibrated"}
MEMBER_KEYS = ("base", "base_model", "repo_id", "license", *STEPS)
# `data` entries of this form name the project's offline texts (conversion/texts.py) instead of a path
TEXT_REF_PREFIX = "texts:"
TEXT_SPLITS = ("train", "held_out")


class ManifestError(ValueError):
    """The release manifest is malformed; the message names the field."""


@dataclass
class Step:
    member: str
    settings: StepSettings

    @property
    def name(self) -> str:
        return self.settings.step

    def command(self) -> str:
        """The step as a `modification` command line (what results.json records)."""
        return self.settings.command_line()


@dataclass
class Member:
    name: str
    base: str
    repo_id: str
    folder: Path  # where its steps write
    steps: list[Step] = field(default_factory=list)
    # symbolic texts the steps read: kind -> split -> the file the settings name (linked before the steps run)
    texts: dict[str, dict[str, Path]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Manifest.


def _fail(field_name: str, message: str) -> None:
    raise ManifestError(f"release manifest: {field_name}: {message}")


def _str(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(field_name, f"must be a non-empty string, got {value!r}")
    return value


def _check_keys(section: dict, allowed: tuple[str, ...], field_name: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        _fail(field_name, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def merge(defaults: dict, changes: dict) -> dict:
    """`changes` over `defaults`, mappings merged key by key (a step's section, convert's routing); a section set to
    null disables the step."""
    merged = dict(defaults)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        merged[key] = merge(defaults[key], value) if both else value
    return merged


def load_manifest(path: str | Path) -> dict:
    """Read and check a release manifest: {"work_dir": str, "members": {name: merged settings}}."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no release manifest at {path}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"release manifest {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        _fail("<root>", "must be a mapping with `members`")
    _check_keys(raw, ("version", "work_dir", "defaults", "members"), "<root>")
    if raw.get("version", 1) != 1:
        _fail("version", f"only version 1 is known, got {raw.get('version')!r}")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        _fail("defaults", "must be a mapping")
    _check_keys(defaults, MEMBER_KEYS, "defaults")
    members = raw.get("members")
    if not isinstance(members, dict) or not members:
        _fail("members", "must be a mapping of member name to settings")
    merged = {}
    for name, spec in members.items():
        if not isinstance(spec, dict):
            _fail(f"members.{name}", "must be a mapping")
        _check_keys(spec, MEMBER_KEYS, f"members.{name}")
        merged[str(name)] = merge(defaults, spec)
    return {"work_dir": raw.get("work_dir", "outputs/release"), "members": merged}


# ---------------------------------------------------------------------------------------------------------------
# Plan: the settings of each member's steps.


def _data(value: Any, field_name: str, member: Member) -> Any:
    """A `data` list with `texts:<kind>/<split>` made the member's link to that text (the rest the settings check)."""
    from modification.conversion.texts import TEXT_KINDS

    if not isinstance(value, (str, list)):
        return value
    items = []
    for item in [value] if isinstance(value, str) else value:
        if isinstance(item, str) and item.startswith(TEXT_REF_PREFIX):
            kind, _, split = item[len(TEXT_REF_PREFIX):].partition("/")
            if kind not in TEXT_KINDS or split not in TEXT_SPLITS:
                _fail(field_name, f"{item!r}: texts are named texts:<kind>/<split> with kind one of "
                                  f"{', '.join(TEXT_KINDS)} and split one of {', '.join(TEXT_SPLITS)}")
            item = member.folder / "texts" / f"{kind}-{split}.txt"
            member.texts.setdefault(kind, {})[split] = item
        items.append(str(item))
    return items


def plan_member(name: str, spec: dict, folder: Path) -> Member:
    """The steps of one member, each a settings object; outputs go under `folder`. `convert` and `push` always run,
    `train`, `calibrate` and `eval` unless their section is null, `fit`, `bench` and `card` when the member has a
    section for them."""
    where = f"members.{name}"
    base = _str(spec.get("base"), f"{where}.base")
    repo_id = _str(spec.get("repo_id"), f"{where}.repo_id")
    if not is_hub_id(repo_id):
        _fail(f"{where}.repo_id", f"must look like org/name, got {repo_id!r}")
    for key in ("base_model", "license"):
        if spec.get(key) is not None:
            _str(spec[key], f"{where}.{key}")
    member = Member(name=name, base=base, repo_id=repo_id, folder=folder)
    # The card and the push name the base by its Hub id and state the licence.
    publish = {"repo_id": repo_id, "base_model": spec.get("base_model") or (base if is_hub_id(base) else None),
               "license": spec.get("license")}
    checkpoint = None  # the folder the last checkpoint-writing step wrote
    for step, cls in STEP_SETTINGS.items():
        section = spec.get(step, {} if step in ("convert", "push") else None)
        if section is None:
            continue
        if not isinstance(section, dict):
            _fail(f"{where}.{step}", "must be a mapping (or null to skip the step)")
        chained = {
            "convert": {"base": base},
            "eval": {"model": checkpoint, "base": base},
            "bench": {"model": checkpoint, "base": base},
            "card": {**publish, "checkpoint": checkpoint, "overwrite": True},
            "push": {**publish, "checkpoint": checkpoint},
        }.get(step, {"model": checkpoint})
        if step in CHECKPOINT_FOLDERS:
            chained["out"] = str(folder / CHECKPOINT_FOLDERS[step])
        if step == "calibrate" and member.steps[-1].name == "train":
            chained["seq_len"] = member.steps[-1].settings.seq_len  # as long as the training sequences
        if "data" in section:
            section = {**section, "data": _data(section["data"], f"{where}.{step}.data", member)}
        settings = cls.from_dict({**chained, **section}, where=f"{where}.{step}")
        member.steps.append(Step(name, settings))
        if step in CHECKPOINT_FOLDERS:
            checkpoint = settings.out or checkpoint  # calibrate without `out` updates the folder in place
    return member


def plan_release(manifest: dict, names: list[str] | None, work_dir: str | None = None) -> list[Member]:
    """The members asked for (all when `names` is None), in manifest order."""
    members = manifest["members"]
    unknown = [n for n in names or [] if n not in members]
    if unknown:
        raise ManifestError(f"unknown member(s) {', '.join(unknown)}; the manifest has {', '.join(members)}")
    root = Path(work_dir or manifest["work_dir"])
    return [plan_member(n, s, root / n) for n, s in members.items() if names is None or n in names]
