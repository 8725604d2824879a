"""Options shared by the `modification` commands, and flags derived from the settings declarations.

Every option of a step is declared once: the routing fields on `MoDConfig` (`ROUTING_FIELDS`), the step settings as
dataclasses (`conversion/settings.py`, `evaluation/settings.py`). `add_settings_arguments` turns those fields into
flags (field `router_threshold` -> `--router-threshold`, with the field's type, default and help), and
`settings_from_args` / `routing_from_args` read them back, keeping only what was given, so every default lives in
the declaration. `fields_argv` goes the other way (values -> command-line arguments), for the release manifest.

Renamed flags keep working for one release as deprecated aliases (`RENAMED`): they warn with a `FutureWarning`
naming the new flag.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import types
import typing
import warnings
from typing import Any, Literal


# Old option name -> the field it now sets. Kept for one release (0.2); the old flag, or manifest key, warns.
RENAMED = {
    "threshold": "router_threshold",  # one name per thing: the config field's
    "sink_tokens": "routing_sink_tokens",
    "lr": "learning_rate",
    "router_lr": "router_learning_rate",
    "target": "executed_fraction",  # "target" also named the per-layer `load_loss_target`
    "target_executed_fraction": "executed_fraction",
}


def flag(name: str) -> str:
    """The command-line flag of a field: `router_threshold` -> `--router-threshold`."""
    return "--" + name.replace("_", "-")


def deprecation_message(old: str, new: str, where: str = "flag") -> str:
    return f"the {where} {old} is deprecated and will be removed in the next release; use {new}"


# --------------------------------------------------------------------------------------------------------------------
# Values: parsing a flag's text by the field's type, and writing a value back as text
# --------------------------------------------------------------------------------------------------------------------


def type_members(tp) -> list:
    """The alternatives of a union type (`float | list[float] | None` -> [float, list[float]]), None left out."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [t for t in typing.get_args(tp) if t is not type(None)]
    return [tp]


def _scalar(text: str, tp) -> Any:
    if tp is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if typing.get_origin(tp) is Literal:
        if text not in typing.get_args(tp):
            raise ValueError(f"expected one of {', '.join(map(str, typing.get_args(tp)))}, got {text!r}")
        return text
    return tp(text)


def comma_list(text: str, item_type=int) -> list:
    """`"1,3,5"` -> `[1, 3, 5]` (empty parts skipped; an empty string is an empty list)."""
    return [item_type(x.strip()) for x in text.split(",") if x.strip()]


def parse_value(text: str, tp) -> Any:
    """A flag's text as a value of type `tp`: scalars, Literals, `list[X]` (comma-separated), and unions of those
    (`float | list[float]`: one number, or a comma-separated list; `Literal["auto"] | list[int]`: auto or indices)."""
    members = type_members(tp)
    scalars = [t for t in members if typing.get_origin(t) is not list]
    lists = [t for t in members if typing.get_origin(t) is list]
    if "," not in text or not lists:
        for t in scalars:
            try:
                return _scalar(text, t)
            except (TypeError, ValueError):
                pass
    for t in lists:
        (item,) = typing.get_args(t)
        try:
            return comma_list(text, item)
        except (TypeError, ValueError):
            pass
    kinds = " or ".join(describe_type(t) for t in members)
    raise argparse.ArgumentTypeError(f"expected {kinds}, got {text!r}")


def describe_type(tp) -> str:
    if typing.get_origin(tp) is list:
        return f"comma-separated {describe_type(typing.get_args(tp)[0])}s"
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(str, typing.get_args(tp)))
    return {int: "integer", float: "number", str: "text", bool: "true/false"}.get(tp, str(tp))


def format_value(value: Any) -> str:
    """A value as a command-line argument (the inverse of `parse_value`): lists comma-separated."""
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --------------------------------------------------------------------------------------------------------------------
# Flags from fields
# --------------------------------------------------------------------------------------------------------------------


class DeprecatedFlag(argparse.Action):
    """A renamed flag: sets the same destination as its new name, with a `FutureWarning` that names the new flag."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(deprecation_message(option_string, self.replacement), FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def field_types(cls, names=None) -> dict:
    """The types of a dataclass's fields (`names`, default all) as objects: the settings modules use `from __future__
    import annotations` (string annotations, evaluated here); MoDConfig's routing fields are objects already (its
    base class's string annotations name torch and must not be evaluated)."""
    names = list(cls.__dataclass_fields__) if names is None else list(names)
    types_of = {name: cls.__dataclass_fields__[name].type for name in names}
    if any(isinstance(tp, str) for tp in types_of.values()):
        hints = typing.get_type_hints(cls)
        types_of = {name: hints[name] for name in names}
    return types_of


def _default_text(default: Any) -> str:
    if default is None or default == [] or default is False:
        return ""
    return f" (default {format_value(default)})"


def add_field_argument(group, f, tp, *, default: Any, required: bool = False) -> None:
    """One flag for dataclass field `f` of type `tp`, and its deprecated aliases."""
    help_text = f.metadata["help"] + ("" if required else _default_text(default))
    kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    old_names = [old for old, new in RENAMED.items() if new == f.name]
    if required and old_names:  # the old name must satisfy the requirement too: one of them is required
        group, required = group.add_mutually_exclusive_group(required=True), False
    if tp is bool:
        kwargs.update(nargs=0, const=True)
        group.add_argument(flag(f.name), action="store_const", **{k: v for k, v in kwargs.items() if k != "nargs"})
    else:
        members = type_members(tp)
        if f.metadata.get("nargs") or f.metadata.get("action"):
            (item,) = typing.get_args(members[0])
            if f.metadata.get("nargs"):
                kwargs.update(nargs=f.metadata["nargs"], action="extend")
            else:
                kwargs.update(action=f.metadata["action"])
            kwargs.update(type=item, metavar=f.name.upper())
        else:
            kwargs["type"] = lambda text, tp=tp: parse_value(text, tp)
            kwargs["type"].__name__ = f.name  # argparse names the flag's type in its error messages
            if typing.get_origin(members[0]) is Literal and len(members) == 1:
                kwargs["choices"] = typing.get_args(members[0])
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            kwargs["metavar"] = ("{" + ",".join(map(str, kwargs["choices"])) + "}") if "choices" in kwargs else \
                f.name.upper()
        group.add_argument(flag(f.name), required=required, **kwargs)
    for old in old_names:
        alias = {k: v for k, v in kwargs.items() if k not in ("help", "metavar", "action")}
        alias.setdefault("nargs", None)
        if tp is bool:
            alias.update(nargs=0, const=True)
        group.add_argument(flag(old), action=DeprecatedFlag, replacement=flag(f.name), help=argparse.SUPPRESS,
                           **alias)


def add_settings_arguments(parser: argparse.ArgumentParser, cls, title: str) -> None:
    """Flags for the fields of settings dataclass `cls` (see the module docstring): the `DataSettings` fields in a
    group "data", the others in a group named `title`."""
    from modification.conversion.settings import data_fields, field_default, settings_fields

    hints = field_types(cls)
    groups = {True: parser.add_argument_group("data"), False: parser.add_argument_group(title)}
    for f in settings_fields(cls):
        add_field_argument(groups[f.name in data_fields()], f, hints[f.name], default=field_default(f),
                           required=f.metadata.get("required", False))


def settings_from_args(cls, args: argparse.Namespace):
    """An instance of settings dataclass `cls` from parsed flags: what was given, the declared defaults for the rest."""
    from modification.conversion.settings import settings_fields

    return cls(**{f.name: getattr(args, f.name) for f in settings_fields(cls) if hasattr(args, f.name)})


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """The routing flags of `convert`: one per `MoDConfig` routing field, defaults and help from its declaration."""
    from modification.conversion.settings import field_default
    from modification.modeling.configuration_mod import ROUTING_FIELDS, MoDConfig

    hints = field_types(MoDConfig, ROUTING_FIELDS)
    group = parser.add_argument_group("routing (MoDConfig fields; defaults are the config's)")
    for name in ROUTING_FIELDS:
        f = MoDConfig.__dataclass_fields__[name]
        add_field_argument(group, f, hints[name], default=field_default(f))


def routing_from_args(args: argparse.Namespace) -> dict:
    """The routing fields given on the command line (the rest keep `MoDConfig`'s defaults)."""
    from modification.modeling.configuration_mod import ROUTING_FIELDS

    return {name: getattr(args, name) for name in ROUTING_FIELDS if hasattr(args, name)}


def settings_field_map(cls) -> dict:
    """Name -> dataclass field, for the option fields of settings dataclass `cls`."""
    from modification.conversion.settings import settings_fields

    return {f.name: f for f in settings_fields(cls)}


def routing_field_map() -> dict:
    """Name -> dataclass field, for the routing fields of `MoDConfig`."""
    from modification.modeling.configuration_mod import ROUTING_FIELDS, MoDConfig

    return {name: MoDConfig.__dataclass_fields__[name] for name in ROUTING_FIELDS}


def fields_argv(values: dict, field_map: dict) -> list[str]:
    """Command-line arguments for field values (`{"learning_rate": 1e-4}` -> `["--learning-rate", "0.0001"]`): a
    true bool is its bare flag, a false one and None are left out, a multi-value field lists its values."""
    argv: list[str] = []
    for name, value in values.items():
        f = field_map[name]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag(name))
        elif f.metadata.get("nargs"):
            argv += [flag(name), *map(str, value)]
        elif f.metadata.get("action") == "append":
            for v in value:
                argv += [flag(name), str(v)]
        else:
            argv += [flag(name), format_value(value)]
    return argv


# --------------------------------------------------------------------------------------------------------------------
# Options many commands share
# --------------------------------------------------------------------------------------------------------------------


def add_model_argument(parser, help: str = "MoD checkpoint: folder or Hub id") -> None:
    parser.add_argument("--model", required=True, help=help)


def add_base_argument(parser) -> None:
    parser.add_argument("--base", default=None,
                        help="base model (folder, Hub id, or a name fetched with `modification fetch-base`); default: "
                             "the checkpoint's base_model_name_or_path if it is available here")


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")


def add_out_argument(parser, required: bool = True, help: str = "output folder (written atomically)") -> None:
    parser.add_argument("--out", required=required, default=None, help=help)


def add_overwrite_argument(parser, help: str = "replace an existing output folder") -> None:
    parser.add_argument("--overwrite", action="store_true", help=help)


def add_progress_argument(parser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def command_line(args: argparse.Namespace) -> str:
    """The exact command that produced the numbers (stored in the results' `commands`)."""
    argv = getattr(args, "argv", None)
    if argv is None:
        return f"modification {args.command}"
    return "modification " + shlex.join(argv)


def run_module_argv(argv: list[str]) -> list[str]:
    """The process arguments that run `modification <argv>` with this Python (for steps run as subprocesses)."""
    return [sys.executable, "-m", "modification.cli", *argv]
