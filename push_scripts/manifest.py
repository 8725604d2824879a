"""The release manifest (`releases.yaml`): reading and checking it, and planning each member's steps as `modification`
command lines (`plan_release`). Running the plan is `release.py`'s.

A member's keys are checked against the options they become: routing keys are MoDConfig's routing fields, the keys
of the `fit`, `train`, `calibrate` and `eval` sections are the fields of their settings dataclasses, so a value is
checked by the same type as the command's flag, and each key becomes that flag (`learning_rate: 1e-4` ->
`--learning-rate 0.0001`). Keys renamed in 0.2 (`threshold`, `lr`, `router_lr`, `target`, `sink_tokens`) still work,
with a FutureWarning naming the new key.

Data can name the project's offline texts symbolically: `texts:<kind>/<split>` (kind shakespeare, kjv or gcide; split
train or held_out, see `conversion/texts.py`). They become `<work_dir>/<member>/texts/<kind>-<split>.txt`, which the
release links to the prepared texts before the steps run, so results and cards name the text `<kind>-<split>.txt`.
"""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_origin

import yaml

from modification.cli.options import (
    RENAMED, deprecation_message, describe_type, field_types, fields_argv, format_value, parse_value,
    routing_field_map, settings_field_map, type_members,
)
from modification.conversion.checkpoint import is_hub_id
from modification.conversion.settings import CalibrateSettings, FitSettings, TrainSettings
from modification.evaluation.settings import EvalSettings


DEFAULT_MANIFEST = Path(__file__).resolve().parent / "releases.yaml"
STEPS = ("convert", "fit", "train", "calibrate", "eval", "card", "push")
# `data` entries of this form name the project's offline texts (conversion/texts.py) instead of a path
TEXT_REF_PREFIX = "texts:"
TEXT_SPLITS = ("train", "held_out")
# The sections whose keys are the fields of a settings dataclass (the flags of the step's command, one name each).
SETTINGS_SECTIONS = {"fit": FitSettings, "train": TrainSettings, "calibrate": CalibrateSettings, "eval": EvalSettings}
SECTION_KEYS = {
    "convert": ("dtype", "revision", "extra_args"),
    **{name: (*settings_field_map(cls), "extra_args") for name, cls in SETTINGS_SECTIONS.items()},
    "card": ("extra_args",),
    "push": ("private", "revision", "create_pr", "dry_run", "extra_args"),
}
MEMBER_KEYS = ("base", "base_model", "repo_id", "license", "routing", *SECTION_KEYS)


class ManifestError(ValueError):
    """The release manifest is malformed; the message names the field."""


@dataclass
class Step:
    member: str
    name: str
    argv: list[str]  # arguments after `modification`
    checkpoint: Path | None = None  # push only: the folder it uploads

    def command(self) -> str:
        return shlex.join(["modification", *self.argv])


@dataclass
class Member:
    name: str
    base: str
    repo_id: str
    steps: list[Step] = field(default_factory=list)
    # symbolic texts the steps read: kind -> split -> the file the commands name (linked before the steps run)
    texts: dict[str, dict[str, Path]] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Manifest.


def _fail(field_name: str, message: str) -> None:
    raise ManifestError(f"release manifest: {field_name}: {message}")


def _str(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(field_name, f"must be a non-empty string, got {value!r}")
    return value


def _str_list(value: Any, field_name: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        _fail(field_name, f"must be a string or a non-empty list of strings, got {value!r}")
    return value


def _data(value: Any, field_name: str, member: Member, folder: Path) -> list[str]:
    """A `data` list as command-line arguments: `texts:<kind>/<split>` becomes the member's link to that text."""
    from modification.conversion.texts import TEXT_KINDS

    args = []
    for item in _str_list(value, field_name):
        if not item.startswith(TEXT_REF_PREFIX):
            args.append(item)
            continue
        kind, _, split = item[len(TEXT_REF_PREFIX):].partition("/")
        if kind not in TEXT_KINDS or split not in TEXT_SPLITS:
            _fail(field_name, f"{item!r}: texts are named texts:<kind>/<split> with kind one of "
                              f"{', '.join(TEXT_KINDS)} and split one of {', '.join(TEXT_SPLITS)}")
        path = folder / "texts" / f"{kind}-{split}.txt"
        member.texts.setdefault(kind, {})[split] = path
        args.append(str(path))
    return args


def _check_keys(section: dict, allowed: tuple[str, ...], field_name: str) -> None:
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        _fail(field_name, f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def _merge(defaults: dict, member: dict) -> dict:
    """Member settings over the defaults; a section set to null in the member disables it."""
    merged = dict(member)
    for key, default in defaults.items():
        if key not in member:
            merged[key] = default
        elif isinstance(default, dict) and isinstance(member[key], dict):
            merged[key] = {**default, **member[key]}
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
        merged[str(name)] = _merge(defaults, spec)
    return {"work_dir": raw.get("work_dir", "outputs/release"), "members": merged}


# ---------------------------------------------------------------------------------------------------------------
# Plan: the command lines of each member's steps.


def _section(spec: dict, key: str, where: str) -> dict | None:
    """A step's section (None when absent or null), deprecated keys renamed with a warning, checked against the
    step's keys."""
    value = spec.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail(f"{where}.{key}", "must be a mapping (or null to skip the step)")
    value = _renamed(value, SECTION_KEYS[key], f"{where}.{key}")
    _check_keys(value, SECTION_KEYS[key], f"{where}.{key}")
    return value


def _extra(section: dict, where: str) -> list[str]:
    extra = section.get("extra_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) for a in extra):
        _fail(f"{where}.extra_args", "must be a list of strings (passed to the command unchanged)")
    return list(extra)


def _renamed(section: dict, allowed, where: str) -> dict:
    """The section with deprecated keys (`RENAMED`: `threshold`, `lr`, `target`, ...) under their new names, each
    with a FutureWarning."""
    out = {}
    for key, value in section.items():
        new = RENAMED.get(key)
        if new is not None and key not in allowed and new in allowed:
            warnings.warn(deprecation_message(f"{where}.{key}", f"{where}.{new}", "manifest key"), FutureWarning,
                          stacklevel=3)
            key = new
        out[key] = value
    return out


def _field_value(value: Any, f, tp, where: str) -> Any:
    """A manifest value checked against its field's type, the way the command's flag would parse it (YAML numbers
    and lists as such; strings through the flag's own parser: YAML reads `1e-3` as a string)."""
    if f.metadata.get("nargs") or f.metadata.get("action"):  # several values: one string or a list of strings
        return _str_list(value, where)
    takes_list = any(get_origin(t) is list for t in type_members(tp))
    if (isinstance(value, bool) and tp is not bool) or (isinstance(value, (list, dict)) and not takes_list):
        _fail(where, f"must be {_expected(tp)}, got {value!r}")
    try:
        parsed = parse_value(value if isinstance(value, str) else format_value(value), tp)
    except Exception:  # argparse.ArgumentTypeError, ValueError: the same message for every kind of mistake
        _fail(where, f"must be {_expected(tp)}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and parsed not in choices:
        _fail(where, f"must be one of {', '.join(choices)}, got {value!r}")
    return parsed


def _expected(tp) -> str:
    members = type_members(tp)
    if float in members and int in members:  # `float | int`: any number
        members = [t for t in members if t is not int]
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return " or ".join(names.get(t) or describe_type(t) for t in members)


def _fields_args(section: dict, field_map: dict, hints: dict, where: str, member: Member | None = None,
                 folder: Path | None = None) -> list[str]:
    """Command-line arguments for a manifest section whose keys are fields (`field_map`); `data` may name texts."""
    values = {}
    for key, value in section.items():
        if key == "extra_args" or value is None:
            continue
        values[key] = _field_value(value, field_map[key], hints[key], f"{where}.{key}")
        if key == "data" and member is not None:
            values[key] = _data(values[key], f"{where}.{key}", member, folder)
    for key, f in field_map.items():
        if f.metadata.get("required") and values.get(key) is None:
            _fail(f"{where}.{key}", "is required")
    return fields_argv({key: values[key] for key in field_map if key in values}, field_map)  # declaration order


def plan_member(name: str, spec: dict, work_dir: Path) -> Member:
    """The steps of one member, each a `modification` command line; outputs go under `work_dir/name`."""
    from modification.modeling.configuration_mod import MoDConfig

    where = f"members.{name}"
    base = _str(spec.get("base"), f"{where}.base")
    repo_id = _str(spec.get("repo_id"), f"{where}.repo_id")
    if not is_hub_id(repo_id):
        _fail(f"{where}.repo_id", f"must look like org/name, got {repo_id!r}")
    folder = work_dir / name
    member = Member(name=name, base=base, repo_id=repo_id)

    routing = spec.get("routing") or {}
    if not isinstance(routing, dict):
        _fail(f"{where}.routing", "must be a mapping")
    routing_fields = routing_field_map()
    routing = _renamed(routing, tuple(routing_fields), f"{where}.routing")
    _check_keys(routing, tuple(routing_fields), f"{where}.routing")
    convert = _section(spec, "convert", where) or {}
    current = folder / "converted"
    argv = ["convert", "--base", base, "--out", str(current),
            *_fields_args(routing, routing_fields, field_types(MoDConfig, routing_fields), f"{where}.routing")]
    for key in ("dtype", "revision"):
        if convert.get(key) is not None:
            argv += [f"--{key}", _str(convert[key], f"{where}.convert.{key}")]
    member.steps.append(Step(name, "convert", argv + _extra(convert, f"{where}.convert")))

    train_seq_len = None
    for step in ("fit", "train", "calibrate"):
        section = _section(spec, step, where)
        if section is None:
            continue
        cls = SETTINGS_SECTIONS[step]
        if step == "train":
            train_seq_len = section.get("seq_len")
        elif step == "calibrate" and section.get("seq_len") is None and train_seq_len is not None:
            section = {**section, "seq_len": train_seq_len}  # calibrate on sequences as long as the training ones
        out = folder / {"fit": "fitted", "train": "trained", "calibrate": "calibrated"}[step]
        args = _fields_args(section, settings_field_map(cls), field_types(cls), f"{where}.{step}", member, folder)
        member.steps.append(Step(name, step, [step, "--model", str(current), "--out", str(out), *args,
                                              *_extra(section, f"{where}.{step}")]))
        current = out

    evaluation = _section(spec, "eval", where)
    if evaluation is not None:
        # eval writes results.json into the checkpoint folder it measures, where push and the card read it
        args = _fields_args(evaluation, settings_field_map(EvalSettings), field_types(EvalSettings),
                            f"{where}.eval", member, folder)
        member.steps.append(Step(name, "eval", ["eval", "--model", str(current), "--base", base, *args,
                                                *_extra(evaluation, f"{where}.eval")]))

    # The card and the push name the base by its Hub id and state the licence.
    card_args = []
    base_model = spec.get("base_model") or (base if is_hub_id(base) else None)
    if base_model:
        card_args += ["--base-model", _str(base_model, f"{where}.base_model")]
    if spec.get("license") is not None:
        card_args += ["--license", _str(spec["license"], f"{where}.license")]

    card = _section(spec, "card", where)
    if card is not None:  # the card is written into the checkpoint folder, where push reads and checks it
        argv = ["card", "--checkpoint", str(current), "--repo-id", repo_id, "--overwrite", *card_args]
        member.steps.append(Step(name, "card", argv + _extra(card, f"{where}.card")))

    push = _section(spec, "push", where) or {}
    argv = ["push", "--checkpoint", str(current), "--repo-id", repo_id, *card_args]
    if push.get("revision") is not None:
        argv += ["--revision", _str(push["revision"], f"{where}.push.revision")]
    for key in ("private", "create_pr", "dry_run"):
        if push.get(key) not in (None, False, True):
            _fail(f"{where}.push.{key}", f"must be true or false, got {push.get(key)!r}")
        if push.get(key):
            argv.append("--" + key.replace("_", "-"))
    member.steps.append(Step(name, "push", argv + _extra(push, f"{where}.push"), checkpoint=current))
    return member


def plan_release(manifest: dict, names: list[str] | None, work_dir: str | None = None) -> list[Member]:
    """The members asked for (all when `names` is None), in manifest order."""
    members = manifest["members"]
    unknown = [n for n in names or [] if n not in members]
    if unknown:
        raise ManifestError(f"unknown member(s) {', '.join(unknown)}; the manifest has {', '.join(members)}")
    root = Path(work_dir or manifest["work_dir"])
    return [plan_member(n, s, root) for n, s in members.items() if names is None or n in names]
