"""What `convert`, `fit`, `train`, `calibrate` and `chat-data` run with: one dataclass per step, each field declared
once with its help and checked when the settings are built (see `steps.py` for how: flags, `--config` files and
manifest sections are these fields), and the fields several steps declare alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from .budget import Budget
from .steps import SettingsError, StepSettings, coerce, setting

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


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
class BudgetSettings(StepSettings):
    """The budget of a step, in the unit that says what it saves: `kv_fraction`, or `flop_fraction` with its
    `flop_context_length` (see `conversion/budget.py`). `budget_required`: whether a step must be given one."""

    budget_required: ClassVar[bool] = True

    kv_fraction: float | None = setting(None, "K/V entries written over the dense model's to reach (1.0 = dense); "
                                              "or give flop_fraction instead")
    flop_fraction: float | None = setting(None, "executed over dense FLOPs of a prefill of flop_context_length tokens "
                                                "to reach (attention counted with its context dependence), instead "
                                                "of kv_fraction")
    flop_context_length: int | None = setting(None, "the prefill length (tokens) flop_fraction is counted at")

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [name for name in ("kv_fraction", "flop_fraction") if getattr(self, name) is not None]
        if len(given) > 1:
            raise SettingsError(self.step, "give one budget, kv_fraction or flop_fraction, not both", "flop_fraction")
        if not given and self.budget_required:
            raise SettingsError(self.step, "is required (or flop_fraction with flop_context_length)", "kv_fraction")
        for name in given:
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise SettingsError(self.step, f"must lie in (0, 1], got {value}", name)
        if self.flop_fraction is not None and self.flop_context_length is None:
            raise SettingsError(self.step, "is required with flop_fraction (the prefill length its FLOPs are counted "
                                           "at)", "flop_context_length")
        if self.flop_context_length is not None and self.flop_fraction is None:
            raise SettingsError(self.step, "counts flop_fraction, which is not given", "flop_context_length")
        if self.flop_context_length is not None and self.flop_context_length < 1:
            raise SettingsError(self.step, f"must be at least 1, got {self.flop_context_length}",
                                "flop_context_length")

    def budget(self) -> Budget | None:
        """The budget asked for (None where a step may run without one)."""
        if self.kv_fraction is None and self.flop_fraction is None:
            return None
        return Budget(self.kv_fraction, self.flop_fraction, self.flop_context_length)


@dataclass
class FitOptions(BudgetSettings):
    """What `fit_routers` does (see `conversion/fit.py`): the budget and how the routers are chosen, without where the
    step reads and writes (`FitSettings` adds that)."""

    step: ClassVar[str] = "fit"

    routing_granularity: Literal["attention", "block", "auto"] = setting(
        "attention", "what a skipped token leaves out: attention (the attention sub-layer and its K/V; it still runs "
                     "the MLP), block (the whole layer), or auto (per layer, whichever costs less calibration loss "
                     "for the same K/V saved)")
    routed_layers: Literal["auto"] | list[int] = setting(
        "auto", "auto: choose the layers from measured costs; or comma-separated layer indices (the budget is still "
                "spread by cost)")
    routing_sink_tokens: int = setting(4, "the first positions of every sequence run every layer (attention sinks)")
    max_skip: float = setting(0.6, "largest share of a layer's tokens its router may skip in the token-routing plans")
    ruinous_factor: float = setting(4.0, "a layer whose removal costs more than this times the median layer's is "
                                         "never routed")
    min_lookup_share: float = setting(
        0.8, "look-up guard: a layer, or a plan, whose skipping leaves less than this share of the dense model's "
             "top-1 accuracy on a repeated passage is never chosen (0: no guard)")
    lookup_passage_tokens: int = setting(64, "tokens of each passage of the look-up check, repeated one calibration "
                                             "block later (at most half a block)")
    lookup_trials: int = setting(4, "passages the look-up check scores (one batched forward pass per measurement)")
    label_samples: int = setting(2, "backward passes with labels drawn from the model's own predictions (the Fisher "
                                    "score)")
    ridge: float = setting(1e-3, "ridge penalty of the router regression, relative to the number of tokens")
    logit_scale: float = setting(2.0, "standard deviation of the fitted router logits on calibration text")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0.0 < self.max_skip <= 1.0, f"max_skip must lie in (0, 1], got {self.max_skip}")
        self.check(0.0 <= self.min_lookup_share <= 1.0,
                   f"min_lookup_share must lie in [0, 1], got {self.min_lookup_share}")
        for name, least in (("routing_sink_tokens", 0), ("label_samples", 1), ("lookup_trials", 1),
                            ("lookup_passage_tokens", 2)):
            self.check(getattr(self, name) >= least, f"{name} must be at least {least}, got {getattr(self, name)}")

    def granularities(self) -> tuple[str, ...]:
        """The granularities the fit measures and may choose per layer."""
        return ("attention", "block") if self.routing_granularity == "auto" else (self.routing_granularity,)


@dataclass
class FitSettings(FitOptions, DataSettings):
    """How `modification fit` sets routers from measurement, no training (see `conversion/fit.py`): `FitOptions` and
    where it reads and writes."""

    step: ClassVar[str] = "fit"

    data: list[str] = data_setting(required=True)
    out: str | None = out_setting()
    overwrite: bool = overwrite_setting()
    progress: bool = progress_setting()
    seq_len: int = setting(512, "tokens per calibration block")
    blocks_per_source: int = setting(4, "blocks of seq_len tokens read from each data source")
    held_out_fraction: float = setting(0.25, "share of the blocks held out to check the budget on")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(0.0 <= self.held_out_fraction < 1.0,
                   f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction}")
        for name in ("seq_len", "blocks_per_source"):
            self.check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")


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

# Optimizer steps of a training run given no budget (`steps`, `max_tokens` or `max_minutes`).
DEFAULT_STEPS = 200


@dataclass
class TrainSettings(BudgetSettings, DataSettings):
    """What `modification train` does (see `conversion/train.py`). The budget is optional: given, the layer-load
    objective holds each routed layer at its share of the checkpoint's plan scaled to it; not given, at the share of
    the checkpoint's own plan (a fit's), or, without one, the paper's objective runs unheld."""

    step: ClassVar[str] = "train"
    budget_required: ClassVar[bool] = False

    data: list[str] = data_setting(required=True)
    out: str | None = out_setting("output folder for the trained, standalone checkpoint")
    checkpoint_dir: str | None = setting(None, "where checkpoints go (default: <out>-checkpoints)", recorded=False)
    resume: bool = setting(False, "continue from the last checkpoint in checkpoint_dir", recorded=False)
    save_adapter: bool = setting(False, "also write the LoRA adapter to <out>/adapter", recorded=False)
    overwrite: bool = overwrite_setting()
    progress: bool = progress_setting()
    recipe: str = setting("lora", "routers: routers only; lora: routers + LoRA on attention/MLP, merged at the end; "
                                  "full: every weight (the paper's recipe)", choices=tuple(RECIPES))
    steps: int | None = setting(None, "optimizer steps (default: 200 when neither max_tokens nor max_minutes is "
                                      "given); with them, the run stops at whichever budget it reaches first")
    max_tokens: int | None = setting(None, "training tokens (over every process): as many optimizer steps as reach "
                                           "them; with steps or max_minutes, the run stops at whichever comes first")
    max_minutes: float | None = setting(None, "stop cleanly after this many minutes of training (this run's: a resumed "
                                              "run gets it afresh), saving a checkpoint and the output as usual; "
                                              "alone, the learning rate stays constant after warm-up")
    seq_len: int = setting(512, "training sequence length (tokens per packed block)")
    batch_size: int = setting(8, "sequences per device per step")
    grad_accum: int = setting(1, "gradient accumulation steps")
    learning_rate: float | None = setting(None, "learning rate of the trained weights (default: routers 1e-4, lora "
                                                "1e-4, full 3e-5)")
    router_learning_rate: float = setting(1e-4, "learning rate of the routers")
    warmup_steps: int = setting(0, "linear warm-up steps")
    weight_decay: float = setting(0.0, "AdamW weight decay of the non-router weights")
    load_loss_coef: float | None = setting(None, "alpha of the layer-load objective (default: the checkpoint's)")
    distill_weight: float = setting(1.0, "weight of the KL divergence from the teacher's next-token distribution "
                                         "(the dense base: self-distillation), at distill_temperature")
    distill_temperature: float = setting(2.0, "temperature of both distributions of the KL term (scaled by T^2)")
    lm_weight: float = setting(0.0, "weight of the LM loss on the text's next tokens")
    hidden_mse_weight: float = setting(0.0, "weight of the hidden-state error at hidden_mse_layers: squared error "
                                            "over the teacher's squared norm, per token (scale-free)")
    hidden_mse_layers: list[int] = setting([], "hidden states the error compares, as transformers numbers them (0: "
                                               "the embeddings, i: layer i-1's output, -1: the final normed state)")
    teacher: str | None = setting(None, "the teacher: a MoD checkpoint (run dense), a base folder or Hub id, or a "
                                        "fetch-base name (default: the trained model itself with routing dense and "
                                        "adapters off; for the full recipe, a frozen copy of --model)",
                                  recorded=False)
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
    repeat_share: float = setting(0.0, "share of training blocks that end by repeating, verbatim, a passage from "
                                       "earlier in the block (data that exercises look-up from far back)")
    repeat_tokens: int = setting(128, "length of a repeated passage (at most seq_len / 2)")
    recalibrate: bool = setting(True, "at the end, calibrate the thresholds of a routed model again, to the budget "
                                      "(or the checkpoint's plan), on blocks of the training text")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("steps", "max_tokens", "seq_len", "batch_size", "grad_accum", "save_steps", "logging_steps"):
            value = getattr(self, name)
            self.check(value is None or value >= 1, f"{name} must be at least 1, got {value}")
        self.check(self.max_minutes is None or self.max_minutes > 0,
                   f"max_minutes must be positive, got {self.max_minutes}")
        self.check(0.0 <= self.eval_fraction < 1.0, f"eval_fraction must lie in [0, 1), got {self.eval_fraction}")
        weights = ("lm_weight", "distill_weight", "hidden_mse_weight")
        for name in weights:
            self.check(getattr(self, name) >= 0, f"{name} must be non-negative, got {getattr(self, name)}")
        self.check(any(getattr(self, name) > 0 for name in weights),
                   "lm_weight, distill_weight and hidden_mse_weight are all zero: nothing to train on (the routing "
                   "objective alone only moves gates)")
        self.check(0.0 <= self.repeat_share <= 1.0, f"repeat_share must lie in [0, 1], got {self.repeat_share}")
        self.check(self.repeat_share == 0 or 1 <= self.repeat_tokens <= self.seq_len // 2,
                   f"repeat_tokens must lie in [1, seq_len / 2 = {self.seq_len // 2}], got {self.repeat_tokens}")
        self.check(self.distill_temperature > 0,
                   f"distill_temperature must be positive, got {self.distill_temperature}")
        self.check(self.hidden_mse_weight == 0 or self.hidden_mse_layers,
                   "hidden_mse_layers must name at least one hidden state when hidden_mse_weight is positive")
        self.check(self.teacher is None or self.uses_teacher(),
                   "teacher is given but distill_weight and hidden_mse_weight are zero: nothing would use it")

    def uses_teacher(self) -> bool:
        """Whether the objective needs the teacher's forward pass."""
        return self.distill_weight > 0 or self.hidden_mse_weight > 0

    def max_steps(self, tokens_per_step: int) -> int | None:
        """The optimizer steps the step and token budgets allow (the smaller), 200 when no budget is given, or None
        when only `max_minutes` bounds the run."""
        budgets = [b for b in (self.steps, self.max_tokens and math.ceil(self.max_tokens / tokens_per_step)) if b]
        if budgets:
            return min(budgets)
        return None if self.max_minutes is not None else DEFAULT_STEPS


@dataclass
class CalibrateSettings(BudgetSettings, DataSettings):
    """How `modification calibrate` sets thresholds to a budget (see `conversion/calibrate.py`)."""

    step: ClassVar[str] = "calibrate"

    data: list[str] = data_setting(required=True)
    out: str | None = out_setting("output folder (default: update the model folder in place)", required=False)
    overwrite: bool = overwrite_setting()
    progress: bool = progress_setting()
    seq_len: int = setting(512, "tokens per calibration block")
    max_blocks: int = setting(16, "calibration blocks of seq_len tokens")
    held_out_fraction: float = setting(0.25, "share of blocks to check the result on")
    global_threshold: bool = setting(False, "one threshold for all layers (default: one per layer)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(self.seq_len >= 2 and self.max_blocks >= 1, "seq_len must be at least 2 and max_blocks at least 1")
        self.check(0.0 <= self.held_out_fraction < 1.0,
                   f"held_out_fraction must lie in [0, 1), got {self.held_out_fraction}")


@dataclass
class ChatDataSettings(StepSettings):
    """What `modification chat-data` writes (see `conversion/chat_data.py`): the base's own greedy answers to prompts
    made from the train parts of the offline texts, as a `.jsonl` file that `train --data` reads."""

    step: ClassVar[str] = "chat-data"

    base: str = setting("smollm2-135m-instruct", "the base that answers: a `fetch-base` name or a model folder (with "
                                                 "a chat template)")
    prompts: int = setting(256, "prompts to answer (about one in eight from the module's general prompts, the rest "
                                "made from passages of the texts' train parts)")
    max_new_tokens: int = setting(256, "longest answer, in tokens (a longer one is cut)")
    batch_size: int = setting(8, "prompts answered together (left-padded)")
    seed: int = setting(0, "which passages, words and general prompts the prompts are made from")
    texts: list[str] = setting([], "text kinds the prompts are made from (shakespeare, kjv, gcide; default: every "
                                    "kind available here)")
    out: str | None = out_setting("output .jsonl file (default: cached under <cache>/healing/<base>/, named by what "
                                  "makes it, and reused when it exists)", required=False)
    overwrite: bool = overwrite_setting("answer again and replace an existing output file")
    progress: bool = progress_setting()

    def __post_init__(self) -> None:
        super().__post_init__()
        from .texts import TEXT_KINDS

        for name in ("prompts", "max_new_tokens", "batch_size"):
            self.check(getattr(self, name) >= 1, f"{name} must be at least 1, got {getattr(self, name)}")
        unknown = [kind for kind in self.texts if kind not in TEXT_KINDS]
        self.check(not unknown, f"texts: unknown kind(s) {', '.join(unknown)}; known: {', '.join(TEXT_KINDS)}")
        self.check(len(set(self.texts)) == len(self.texts), f"texts names a kind twice: {', '.join(self.texts)}")
