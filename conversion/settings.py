"""What `fit`, `train` and `calibrate` run with: one dataclass per step, each field declared once with its help.

These declarations are the single source of each option: the command-line flags are derived from them
(`modification.cli.options.add_settings_arguments`: field `learning_rate` is `--learning-rate`, its help and default
come from here), so are the release manifest's section keys (`push_scripts/release.py`), and the `training` section
of results.json and the model card print the fields by name. The routing fields are declared the same way on
`MoDConfig` (`modification.modeling.configuration_mod.ROUTING_FIELDS`).

Field metadata: `help` (required), `choices`, `required` (the command needs it although the dataclass has a default),
`nargs="+"` (a flag that takes several values: `--data a.txt b.txt`), `action="append"` (a repeatable flag).
Other list fields are written as comma-separated values on the command line.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal


def setting(default: Any, help: str, **metadata: Any) -> Any:
    """A settings field: `default` (lists are copied per instance) and the help text every surface shows."""
    metadata = {"help": help, **metadata}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def field_default(f) -> Any:
    """The default of a dataclass field (calling its factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def settings_fields(cls) -> list:
    """The fields of a settings dataclass that are options (every field with a `help`)."""
    return [f for f in fields(cls) if "help" in f.metadata]


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


def data_setting(required: bool) -> Any:
    """The `data` field: required by the steps that cannot run without text (fit, train, calibrate)."""
    return setting([], ".txt/.jsonl/.json files or folders, save_to_disk folders, or datasets.load_dataset names",
                   nargs="+", required=required)


@dataclass
class DataSettings:
    """The text a step reads (see `conversion/data.py` for what a source can be)."""

    data: list[str] = data_setting(required=False)
    text_field: str = setting("text", "field holding the text in jsonl/json/datasets records")
    split: str = setting("train", "split of a datasets source")
    data_config: str | None = setting(None, "config of a datasets source (e.g. wikitext-2-raw-v1)")


@dataclass
class FitSettings(DataSettings):
    """How `modification fit` sets routers from measurement, no training (see `conversion/fit.py`)."""

    data: list[str] = data_setting(required=True)
    executed_fraction: float = setting(0.8, "executed fraction of token-layer work to reach (1.0 = dense)",
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


@dataclass
class TrainSettings(DataSettings):
    """What `modification train` does (see `conversion/train.py`)."""

    data: list[str] = data_setting(required=True)
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

    def validate(self) -> None:
        from .data import DataError

        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        for name in ("steps", "seq_len", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.data:
            raise DataError("no training data given (--data)")


@dataclass
class CalibrateSettings(DataSettings):
    """How `modification calibrate` sets thresholds to a compute budget (see `conversion/calibrate.py`)."""

    data: list[str] = data_setting(required=True)
    executed_fraction: float = setting(0.75, "executed fraction of token-layer work to reach", required=True)
    seq_len: int = setting(512, "tokens per calibration block")
    max_blocks: int = setting(16, "calibration blocks of seq_len tokens")
    held_out_fraction: float = setting(0.25, "share of blocks to check the result on")
    global_threshold: bool = setting(False, "one threshold for all layers (default: one per layer)")


def data_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(DataSettings))
