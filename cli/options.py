"""Flags derived from the settings dataclasses (`conversion/settings.py`): one flag per field, named, typed and
documented by its declaration, and `--config` for a YAML file of the same keys (`HfArgumentParser.parse_yaml_file`'s
role). A flag's text is parsed and checked where a config file's values are: when the settings object is built
(`settings_from_args`), so every default and every check lives in the declaration."""

from __future__ import annotations

import argparse
import typing
from dataclasses import fields
from typing import Any, Literal

from modification.conversion.settings import data_fields
from modification.conversion.steps import field_default, field_types, flag, type_members


def _default_text(default: Any) -> str:
    if default is None or isinstance(default, bool) or default in ([], {}):
        return ""
    return f" (default {','.join(map(str, default)) if isinstance(default, list) else default})"


def add_field_argument(group, f, tp, dest: str | None = None) -> None:
    """The flag of dataclass field `f` of type `tp` (`--no-<name>` for a bool that defaults to true)."""
    default = field_default(f)
    help_text = f.metadata["help"] + (" (required)" if f.metadata.get("required") else _default_text(default))
    kwargs: dict[str, Any] = {"dest": dest or f.name, "default": argparse.SUPPRESS, "help": help_text}
    if tp is bool:
        kwargs["help"] = ("no " if default else "") + help_text
        group.add_argument(flag(f.name, default), action="store_const", const=not default, **kwargs)
        return
    if f.metadata.get("nargs"):
        kwargs.update(nargs=f.metadata["nargs"], action="extend")
    elif f.metadata.get("action"):
        kwargs.update(action=f.metadata["action"])
    members = type_members(tp)
    choices = f.metadata.get("choices")
    if choices is None and len(members) == 1 and typing.get_origin(members[0]) is Literal:
        choices = typing.get_args(members[0])
    if choices:
        kwargs["choices"] = choices
    kwargs["metavar"] = "{" + ",".join(choices) + "}" if choices else f.name.upper()
    group.add_argument(flag(f.name), **kwargs)


def add_settings_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """`--config` and a flag per field of settings dataclass `cls`: the text fields in a group "data", convert's
    `routing` as one flag per `MoDConfig` routing field."""
    parser.add_argument("--config", help="YAML file of these settings, keyed by the flags' names with underscores "
                                         "(seq_len: 512); flags given as well override its values")
    types_of = field_types(cls)
    groups = {True: parser.add_argument_group("data"), False: parser.add_argument_group(f"{cls.step} settings")}
    for f in fields(cls):
        if f.name == "routing":
            from modification.modeling.configuration_mod import ROUTING_FIELDS, MoDConfig

            group = parser.add_argument_group("routing (MoDConfig fields; defaults are the config's)")
            for name in ROUTING_FIELDS:
                routing_field = MoDConfig.__dataclass_fields__[name]
                add_field_argument(group, routing_field, routing_field.type, dest=f"routing.{name}")
        else:
            add_field_argument(groups[f.name in data_fields()], f, types_of[f.name])


def settings_from_args(cls, args: argparse.Namespace):
    """Settings dataclass `cls` from the flags given (and the `--config` file, under them)."""
    given: dict[str, Any] = {}
    for dest, value in vars(args).items():
        name, _, routing_field = dest.partition(".")
        if routing_field:
            given.setdefault("routing", {})[routing_field] = value
        elif name in cls.__dataclass_fields__:
            given[name] = value
    if args.config:
        return cls.from_yaml(args.config, **given)
    return cls.from_dict(given)
