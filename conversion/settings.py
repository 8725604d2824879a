"""What each step runs with: one dataclass per step, each field declared once with its help, checked when built.

A step (`convert`, `fit`, `train`, `calibrate` here; `eval`, `bench` in `evaluation/settings.py`; `card`, `push` in
`model_cards/settings.py`) is a library function taking its settings object, which holds everything the step needs,
its input and output folders included (as transformers' `TrainingArguments` holds `output_dir`). The object is made
from flags (`modification <step> --help`: field `learning_rate` is `--learning-rate`), from a YAML file of the same
keys (`modification <step> --config fit.yaml`, as `HfArgumentParser.parse_yaml_file`), or from the step's section of
the release manifest; each way ends in the constructor, where every value is checked once (`__post_init__`, as peft's
configs are): its type (a value given as text, a flag or YAML's `1e-3`, is parsed by the field's type), whether it
is required, its range. `command_line()` writes the settings back as the equivalent flags (recorded with results).

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


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


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


# --------------------------------------------------------------------------------------------------------------------
# Fields several steps declare alike
# --------------------------------------------------------------------------------------------------------------------


def model_setting() -> Any:
    return setting(None, "MoD checkpoint: folder or Hub id", required=True, recorded=False)


def out_setting(help: str = "output folder (written atomically)", required: bool = True) -> Any:
    return setting(None, help, required=required, recorded=False)


def overwrite_setting(help: str = "replace an existing output folder") -> Any:
    return setting(False, help, recorded=False)


def progress_setting() -> Any:
    return setting(True, "progress bars", recorded=False)


def data_setting(required: bool) -> Any:
    """The `data` field: required by the steps that cannot run without text (fit, train, calibrate)."""
    return setting([], ".txt/.jsonl/.json files or folders, save_to_disk folders, or datasets.load_dataset names",
                   nargs="+", required=required)


@dataclass
class DataSettings(StepSettings):
    """What a step reads: a MoD checkpoint and text (see `conversion/data.py` for what a text source can be)."""

    model: str | None = model_setting()
    data: list[str] = data_setting(required=False)
    text_field: str = setting("text", "field holding the text in jsonl/json/datasets records")
    split: str = setting("train", "split of a datasets source")
    data_config: str | None = setting(None, "config of a datasets source (e.g. wikitext-2-raw-v1)")


def data_fields() -> tuple[str, ...]:
    """The text fields (`data` and how it is read), which records name apart (`local_paths.data_names`)."""
    return tuple(f.name for f in fields(DataSettings) if f.name != "model")


# --------------------------------------------------------------------------------------------------------------------
# The steps of conversion
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ConvertSettings(StepSettings):
    """What `modification convert` does (see `conversion/convert.py`)."""

    step: ClassVar[str] = "convert"

    base: str | None = setting(None, "base model: Hub id, folder, or a name fetched with `modification fetch-base`",
                               required=True)
    out: str | None = out_setting()
    dtype: Dtype = setting("auto", "dtype the weights are loaded and saved in (auto: the base's)")
    revision: str | None = setting(None, "Hub revision of the base")
    overwrite: bool = overwrite_setting()
    trust_remote_code: bool = setting(False, "allow custom code in the base checkpoint")
    routing: dict = setting({}, "MoDConfig's routing fields (ROUTING_FIELDS; one flag each, `convert --help`); "
                                "the others keep the config's defaults")

    def __post_init__(self) -> None:
        super().__post_init__()
        from modification.modeling.configuration_mod import ROUTING_FIELDS, MoDConfig

        unknown = sorted(map(str, set(self.routing) - set(ROUTING_FIELDS)))
        if unknown:
            raise SettingsError(self.step, f"unknown key(s) {', '.join(unknown)}; the routing fields are "
                                           f"{', '.join(ROUTING_FIELDS)}", "routing")
        for name, value in self.routing.items():
            try:
                self.routing[name] = coerce(value, MoDConfig.__dataclass_fields__[name].type)
            except ValueError as err:
                raise SettingsError(self.step, str(err), f"routing.{name}") from None


@dataclass
class FitSettings(DataSettings):
    """How `modification fit` sets routers from measurement, no training (see `conversion/fit.py`)."""

    step: ClassVar[str] = "fit"

    data: list[str] = data_setting(required=True)
    out: str | None = out_setting()
    overwrite: bool = overwrite_setting()
    progress: bool = progress_setting()
    executed_fraction: float | None = setting(None, "executed fraction of token-layer work to reach (1.0 = dense)",
                                              required=True)
    routed_layers: Literal["auto"] | list[int] = setting(
        "auto", "auto: choose the layers from measured costs; or comma-separated layer indices (the budget is still "
                "spread by cost)")
    routing_sink_tokens: int = setting(4, "the first positions of every sequence run every layer (attention sinks)")
    max_skip: float = setting(0.6, "largest share of a layer's tokens its router may skip in the token-routing plans")
    ruinous_factor: float = setting(4.0, "a layer whose removal costs more than this times the median layer's is "
                                         "never routed")
    label_samples: int = setting(2, "backward passes with labels drawn from the model's own predictions (the Fisher "
                                    "score)")
    ridge: float = setting(1e-3, "ridge penalty of the router regression, relative to the number of tokens")
    logit_scale: float = setting(2.0, "standard deviation of the fitted router logits on calibration text")
    seq_len: int = setting(512, "tokens per calibration block")
    blocks_per_source: int = setting(4, "blocks of seq_len tokens read from each data source")
    held_out_fraction: float = setting(0.25, "share of the blocks held out to check the executed fraction on")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0.0 < self.executed_fraction <= 1.0,
                   f"executed_fraction must lie in (0, 1], got {self.executed_fraction}")
        self.check(0.0 < self.max_skip <= 1.0, f"max_skip must lie in (0, 1], got {self.max_skip}")
        self.check(0.0 <= self.held_out_fraction < 1.0,
                   f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction}")
        for name in ("routing_sink_tokens", "label_samples", "seq_len", "blocks_per_source"):
            self.check(getattr(self, name) >= (0 if name == "routing_sink_tokens" else 1),
                       f"{name} must be {'non-negative' if name == 'routing_sink_tokens' else 'at least 1'}, got "
                       f"{getattr(self, name)}")


# The training recipes and what each trains; `train --recipe`, the release manifest and the card read this.
RECIPES = {
    "routers": "only the routers were trained; every base weight is unchanged",
    "lora": "routers plus LoRA adapters (merged into the weights)",
    "full": "all weights were trained",
}

# Learning rates per recipe when `learning_rate` is not given. Measured on SmolLM2-135M-Instruct (README, "Training
# defaults"): LoRA at 2e-4 with routers at 1e-2 and a load-loss coefficient of 1.0 wrecked the model (LM loss 6.6-7.4)
# in two steps. From fitted routers, routers only need to follow the LoRA-adapted layers slowly.
DEFAULT_LEARNING_RATE = {"routers": 1e-4, "lora": 1e-4, "full": 3e-5}


@dataclass
class TrainSettings(DataSettings):
    """What `modification train` does (see `conversion/train.py`)."""

    step: ClassVar[str] = "train"

    data: list[str] = data_setting(required=True)
    out: str | None = out_setting("output folder for the trained, standalone checkpoint")
    checkpoint_dir: str | None = setting(None, "where checkpoints go (default: <out>-checkpoints)", recorded=False)
    resume: bool = setting(False, "continue from the last checkpoint in checkpoint_dir", recorded=False)
    save_adapter: bool = setting(False, "also write the LoRA adapter to <out>/adapter", recorded=False)
    overwrite: bool = overwrite_setting()
    progress: bool = progress_setting()
    recipe: str = setting("lora", "routers: routers only; lora: routers + LoRA on attention/MLP, merged at the end; "
                                  "full: every weight (the paper's recipe)", choices=tuple(RECIPES))
    steps: int = setting(200, "optimizer steps")
    seq_len: int = setting(512, "training sequence length (tokens per packed block)")
    batch_size: int = setting(8, "sequences per device per step")
    grad_accum: int = setting(1, "gradient accumulation steps")
    learning_rate: float | None = setting(None, "learning rate of the trained weights (default: routers 1e-4, lora "
                                                "1e-4, full 3e-5)")
    router_learning_rate: float = setting(1e-4, "learning rate of the routers")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay of the non-router weights")
    load_loss_coef: float | None = setting(None, "alpha of the layer-load objective (default: the checkpoint's)")
    executed_fraction: float | None = setting(
        None, "executed fraction to hold: the load objective pushes each routed layer towards the routed fraction "
              "that gives it, from both sides (default: a fitted checkpoint's per-layer plan)")
    lora_r: int = setting(16, "LoRA rank")
    lora_alpha: int = setting(32, "LoRA alpha")
    lora_dropout: float = setting(0.0, "LoRA dropout")
    save_steps: int = setting(100, "write a checkpoint every N steps")
    logging_steps: int = setting(10, "log every N steps")
    eval_steps: int | None = setting(None, "evaluate held-out loss every N steps")
    eval_fraction: float = setting(0.0, "share of each source held out for eval_steps")
    seed: int = setting(0, "random seed")
    gradient_checkpointing: bool = setting(False, "activation checkpointing (less memory, more compute)")
    fsdp: bool = setting(False, "shard with FSDP (multi-GPU, under accelerate launch)")
    data_weights: list[float] | None = setting(None, "mixing weights, one per data source")
    max_tokens_per_source: int | None = setting(None, "read at most this many tokens per source")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            self.check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        self.check(self.executed_fraction is None or 0.0 < self.executed_fraction <= 1.0,
                   f"executed_fraction must lie in (0, 1], got {self.executed_fraction}")
        self.check(0.0 <= self.eval_fraction < 1.0, f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")


@dataclass
class CalibrateSettings(DataSettings):
    """How `modification calibrate` sets thresholds to a compute budget (see `conversion/calibrate.py`)."""

    step: ClassVar[str] = "calibrate"

    data: list[str] = data_setting(required=True)
    out: str | None = out_setting("output folder (default: update the model folder in place)", required=False)
    overwrite: bool = overwrite_setting()
    progress: bool = progress_setting()
    executed_fraction: float | None = setting(None, "executed fraction of token-layer work to reach", required=True)
    seq_len: int = setting(512, "tokens per calibration block")
    max_blocks: int = setting(16, "calibration blocks of seq_len tokens")
    held_out_fraction: float = setting(0.25, "share of blocks to check the result on")
    global_threshold: bool = setting(False, "one threshold for all layers (default: one per layer)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0.0 < self.executed_fraction <= 1.0,
                   f"executed_fraction must lie in (0, 1], got {self.executed_fraction}")
        self.check(self.seq_len >= 2 and self.max_blocks >= 1, "seq_len must be at least 2 and max_blocks at least 1")
        self.check(0.0 <= self.held_out_fraction < 1.0,
                   f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction}")
