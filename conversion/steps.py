"""A step is a settings object: the base of every step's settings dataclass, and how its values are given.

A step (`convert`, `fit`, `train`, `calibrate` in `conversion/settings.py`; `eval`, `bench` in
`evaluation/settings.py`; `card`, `push` in `model_cards/settings.py`) is a library function taking its settings
object, which holds everything the step needs, its input and output folders included (as transformers'
`TrainingArguments` holds `output_dir`). The object is made from flags (`modification <step> --help`: field
`learning_rate` is `--learning-rate`), from a YAML file of the same keys (`modification <step> --config fit.yaml`, as
`HfArgumentParser.parse_yaml_file`), or from the step's section of the release manifest; each way ends in the
constructor, where every value is checked once (`StepSettings.__post_init__`, as peft's configs are): its type (a
value given as text, a flag or YAML's `1e-3`, is parsed by the field's type), whether it is required, its range.
`command_line()` writes the settings back as the equivalent flags (recorded with results).

Field metadata: `help` (every field), `required`, `choices`, `nargs="+"` (a flag of several values: `--data a.txt
b.txt`), `action="append"` (a repeatable flag), `recorded=False` (where the step reads and writes, not what it does:
left out of the records of fit and train). Other list fields are comma-separated on the command line. A bool field
that defaults to true is turned off by `--no-<name>` (`--no-progress`).
"""

from __future__ import annotations

import copy
import functools
import shlex
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml


class SettingsError(ValueError):
    """Wrong settings: the message names where they came from (a step, a config file, a manifest section) and the
    field."""

    def __init__(self, where: str, problem: str, field_name: str | None = None):
        self.where, self.problem, self.field_name = where, problem, field_name
        super().__init__(f"{where}.{field_name}: {problem}" if field_name else f"{where}: {problem}")

    def at(self, where: str) -> SettingsError:
        return SettingsError(where, self.problem, self.field_name)


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A settings field: `default` (lists and mappings are copied per instance) and the help every surface shows."""
    metadata = {"help": help, **metadata}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_default(f) -> Any:
    """The default of a dataclass field (calling its factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def flag(name: str, default: Any = None) -> str:
    """The command-line flag of a field: `router_threshold` -> `--router-threshold`; `--no-progress` for a bool
    field `progress` that defaults to true."""
    return ("--no-" if default is True else "--") + name.replace("_", "-")


# --------------------------------------------------------------------------------------------------------------------
# Values: a value (or its text) as a field's type
# --------------------------------------------------------------------------------------------------------------------


def type_members(tp) -> list:
    """The alternatives of a union type (`float | list[float] | None` -> [float, list[float]]), None left out."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [t for t in typing.get_args(tp) if t is not type(None)]
    return [tp]


def describe_type(tp) -> str:
    members = type_members(tp)
    if float in members and int in members:  # `float | int`: any number
        members = [t for t in members if t is not int]
    words = []
    for t in members:
        if typing.get_origin(t) is list:
            words.append(f"a list of {describe_type(typing.get_args(t)[0]).removeprefix('a ').removeprefix('an ')}s")
        elif typing.get_origin(t) is Literal:
            values = ", ".join(map(str, typing.get_args(t)))
            words.append(values if len(typing.get_args(t)) == 1 else f"one of {values}")
        else:
            words.append({int: "an integer", float: "a number", str: "a string", bool: "true or false",
                          dict: "a mapping"}[t])
    return " or ".join(words)


def _as(value: Any, tp, many: bool) -> Any:
    """`value` as the (non-union) type `tp`, or ValueError. Text is parsed: a number, true/false, a Literal, or a
    comma-separated list (one item when `many`: a flag of several values gives them apart)."""
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = [value] if many else [part.strip() for part in value.split(",") if part.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]  # one value where a list is taken
        (item,) = typing.get_args(tp)
        return [_as(v, item, False) for v in value]
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp in (int, float) and not isinstance(value, bool):
        if isinstance(value, (str, int)) or (tp is float and isinstance(value, float)):
            return tp(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML reads `revision: 1234` as a number
            return str(value)
    elif tp is dict and isinstance(value, Mapping):
        return dict(value)
    raise ValueError(value)


def coerce(value: Any, tp, many: bool = False) -> Any:
    """`value` as type `tp` (the first alternative of a union that takes it), or a ValueError saying what it must
    be."""
    if value is None and type(None) in typing.get_args(tp):
        return None
    for member in type_members(tp):
        try:
            return _as(value, member, many)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"must be {describe_type(tp)}, got {value!r}")


@functools.cache
def field_types(cls) -> dict:
    """The fields' types as objects (the settings modules use `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


# --------------------------------------------------------------------------------------------------------------------
# The base of every step's settings
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class StepSettings:
    """The settings of one step (`step`): built from keyword arguments, flags, a YAML file or a manifest section,
    and checked on construction."""

    step: ClassVar[str]

    def __post_init__(self) -> None:
        types_of = field_types(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            try:
                value = coerce(value, types_of[f.name], many=bool(f.metadata.get("nargs") or f.metadata.get("action")))
            except ValueError as err:
                raise SettingsError(self.step, str(err), f.name) from None
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise SettingsError(self.step, f"must be one of {', '.join(choices)}, got {value!r}", f.name)
            setattr(self, f.name, value)
        for f in fields(self):
            if f.metadata.get("required") and getattr(self, f.name) in (None, [], ""):
                raise SettingsError(self.step, "is required", f.name)

    def check(self, ok: bool, problem: str) -> None:
        """A range check of `__post_init__`: `problem` names the field."""
        if not ok:
            raise SettingsError(self.step, problem)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], where: str | None = None):
        """Settings from a mapping of field names (a YAML file, a manifest section); errors name `where`."""
        where = where or cls.step
        if not isinstance(values, Mapping):
            raise SettingsError(where, f"must be a mapping of {cls.step} settings, got {values!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(map(str, set(values) - set(names)))
        if unknown:
            raise SettingsError(where, f"unknown key(s) {', '.join(unknown)}; the {cls.step} settings are "
                                       f"{', '.join(names)}")
        try:
            return cls(**values)
        except SettingsError as err:
            raise err.at(where) from None

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any):
        """Settings from a YAML file of field names (`overrides`, e.g. flags, on top)."""
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"no {cls.step} settings file at {path}") from None
        except yaml.YAMLError as err:
            raise SettingsError(f"{cls.step} settings in {path}", f"not valid YAML: {err}") from None
        if not isinstance(values, Mapping):
            raise SettingsError(f"{cls.step} settings in {path}", "must be a mapping of setting names to values")
        for key, value in overrides.items():  # a mapping (convert's routing) is updated key by key
            both = isinstance(value, Mapping) and isinstance(values.get(key), Mapping)
            values[key] = {**values[key], **value} if both else value
        return cls.from_dict(values, where=f"{cls.step} settings in {path}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def write_yaml(self, path: str | Path) -> Path:
        from .atomic import atomic_write_text

        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))
        return Path(path)

    def recorded(self) -> dict[str, Any]:
        """What the step does (the fields recorded with its results): every field but where it reads and writes."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("recorded", True)}

    def command_line(self) -> str:
        """The `modification` command with these settings as flags (the ones that differ from the defaults)."""
        words = ["modification", self.step]
        for f in fields(self):
            value, default = getattr(self, f.name), field_default(f)
            if value == default or value is None:
                continue
            items = value.items() if isinstance(value, dict) else [(f.name, value)]  # convert's routing fields
            for name, item in items:
                if isinstance(item, bool):
                    words.append(flag(name, default))
                elif f.metadata.get("nargs"):
                    words += [flag(name), *map(str, item)]
                elif f.metadata.get("action") == "append":
                    words += [word for v in item for word in (flag(name), str(v))]
                else:
                    words += [flag(name), ",".join(map(str, item)) if isinstance(item, list) else str(item)]
        return shlex.join(words)
