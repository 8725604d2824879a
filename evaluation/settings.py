"""What `eval`, `bench` and `show-routing` run with, declared and checked as `conversion/settings.py` declares the
conversion steps (see `conversion/steps.py`): their flags, `--config` files and manifest sections are these fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from modification.conversion.settings import DataSettings, Dtype, model_setting, out_setting, progress_setting
from modification.conversion.steps import StepSettings, setting


def device_setting() -> Any:
    return setting("auto", "auto (CUDA when present), cpu or cuda", recorded=False)


def dtype_setting() -> Any:
    return setting("auto", "auto: bfloat16 on CUDA, float32 on CPU")


def out_of_checkpoint_setting(what: str) -> Any:
    return out_setting(f"folder for {what} (default: the checkpoint folder if local, else ./<org--name>)",
                       required=False)


@dataclass
class MeasureSettings(DataSettings):
    """A MoD checkpoint measured next to its base: what eval and bench share."""

    base: str | None = setting(None, "base model (folder, Hub id, or a name fetched with `modification fetch-base`); "
                                     "default: the checkpoint's base_model_name_or_path if it is available here")
    split: str = setting("test", "split of a datasets source")
    device: str = device_setting()
    dtype: Dtype = dtype_setting()
    progress: bool = progress_setting()


@dataclass
class EvalSettings(MeasureSettings):
    """What `modification eval` measures (see `evaluation/quality.py`, `conversion/lookup.py` and
    `evaluation/tasks.py`)."""

    step: ClassVar[str] = "eval"

    no_base: bool = setting(False, "evaluate the MoD model alone")
    out: str | None = out_of_checkpoint_setting("results.json, plots and records")
    context_lengths: list[int] = setting([1024], "context lengths for perplexity (at most the model's "
                                                 "max_position_embeddings)")
    stride: int | None = setting(None, "sliding-window stride in tokens (default: context / 2)")
    full_context: bool = setting(
        True, "score only tokens with at least context - stride tokens of context: the first window scores its last "
              "stride tokens, as every later window does, and the text's first context - stride tokens are read, "
              "never scored (so perplexity at 8192 is that of tokens with 4096 or more tokens behind them); off, the "
              "first window scores all its tokens, from the text's second token on")
    max_tokens: int | None = setting(None, "use at most this many tokens of each dataset")
    lookup_distances: list[int] = setting(
        [512, 2048], "look-up check (conversion/lookup.py): tokens from a random passage to its repeat, the filler "
                     "text between them from the first data source; a distance the filler or the model's positions "
                     "cannot hold is left out with a warning (an empty string: no look-up)")
    lookup_passage_tokens: int = setting(128, "look-up check: tokens in the repeated passage")
    lookup_trials: int = setting(4, "look-up and passkey checks: passages per distance (each with its own tokens "
                                    "and filler), pass keys per prompt length (each at its own depth)")
    passkey_lengths: list[int] = setting(
        [], "passkey check (conversion/lookup.py): prompt lengths in tokens of a pass key hidden in filler sentences "
            "and asked for at the end (SmolLM2-135M-Instruct answers it at 512 to 7.5k tokens); a length past the "
            "model's positions is left out with a warning (default: none, e.g. 2048,8192)")
    tasks: list[str] | None = setting(None, "lm-eval tasks (names, globs or YAML files)")
    tasks_path: list[str] = setting([], "folder or YAML file of local lm-eval tasks (repeatable)", action="append")
    limit: float | None = setting(None, "lm-eval: examples per task (>= 1) or fraction of them (< 1)")
    num_fewshot: int | None = setting(None, "lm-eval: few-shot examples")
    tasks_batch_size: str = setting("1", "lm-eval batch size (an integer or auto)")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(bool(self.data or self.tasks or self.passkey_lengths),
                   "nothing to evaluate: give data (perplexity, --data), tasks (lm-eval, --tasks) and/or "
                   "passkey_lengths (--passkey-lengths)")
        self.check(all(n >= 2 for n in self.context_lengths),
                   f"context_lengths must be at least 2, got {self.context_lengths}")
        self.check(self.stride is None or self.stride >= 1, "stride must be a positive number of tokens")
        self.check(self.max_tokens is None or self.max_tokens >= 2, "max_tokens must be at least 2")
        self.check(self.lookup_passage_tokens >= 2,
                   f"lookup_passage_tokens must be at least 2, got {self.lookup_passage_tokens}")
        self.check(all(d >= self.lookup_passage_tokens for d in self.lookup_distances),
                   f"lookup_distances must be at least lookup_passage_tokens ({self.lookup_passage_tokens}: the "
                   f"copies would overlap), got {self.lookup_distances}")
        self.check(self.lookup_trials >= 1, f"lookup_trials must be at least 1, got {self.lookup_trials}")
        self.check(all(n >= 128 for n in self.passkey_lengths),
                   f"passkey_lengths must be at least 128 tokens (the question and the key take about 80), got "
                   f"{self.passkey_lengths}")
        self.check(self.limit is None or self.limit > 0, f"limit must be positive, got {self.limit}")
        self.check(self.tasks_batch_size == "auto" or self.tasks_batch_size.isdigit(),
                   f"tasks_batch_size must be a positive integer or auto, got {self.tasks_batch_size!r}")


@dataclass
class BenchSettings(MeasureSettings):
    """What `modification bench` times (see `evaluation/benchmark.py`). Without `data` the prompts are random ids."""

    step: ClassVar[str] = "bench"

    out: str | None = out_of_checkpoint_setting("bench.json, bench.png and results.json")
    lengths: list[int] = setting([1024, 4096], "prefill context lengths (long context: 2048,4096,8192)")
    repetitions: int = setting(5, "timed repetitions per measurement, after one warm-up")
    decode_batch_sizes: list[int] = setting([1, 4], "decode batch sizes (an empty string: no decode benchmark)")
    decode_tokens: int = setting(32, "new tokens per decode run")
    decode_prompt_length: int = setting(256, "prompt length before decoding (long context: 4096)")
    kv_fraction: float | None = setting(
        None, "calibrate thresholds on each prompt to this KV fraction first (speed at a chosen budget, e.g. for "
              "random-weight models); the results JSON is then left alone")
    threads: int | None = setting(None, "CPU threads for torch (default: torch's choice); on a machine shared with "
                                        "other jobs, 1 avoids threads waiting on each other")
    seed: int = setting(0, "random seed of the prompts")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check(bool(self.lengths), "lengths needs at least one context length")
        self.check(all(n >= 1 for n in self.lengths + self.decode_batch_sizes),
                   "lengths and decode_batch_sizes must be positive")
        self.check(min(self.repetitions, self.decode_tokens, self.decode_prompt_length) >= 1,
                   "repetitions, decode_tokens and decode_prompt_length must be positive")
        self.check(self.kv_fraction is None or 0.0 < self.kv_fraction <= 1.0,
                   f"kv_fraction must lie in (0, 1], got {self.kv_fraction}")
        self.check(self.threads is None or self.threads >= 1, "threads must be at least 1")


@dataclass
class RoutingMapSettings(StepSettings):
    """What `modification show-routing` draws (see `evaluation/plots.py`)."""

    step: ClassVar[str] = "show-routing"

    model: str | None = model_setting()
    text: str | None = setting(None, "the text to route")
    text_file: str | None = setting(None, "read the text from this file")
    max_tokens: int = setting(256, "route at most this many tokens")
    out: str = setting("routing", "output folder")
    device: str = device_setting()
    dtype: Dtype = dtype_setting()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check((self.text is None) != (self.text_file is None), "give the text or a text_file (one of them)")
        self.check(self.text is None or bool(self.text.strip()), "the text is empty: give a text with some words")
        self.check(self.max_tokens >= 1, "max_tokens must be at least 1")
