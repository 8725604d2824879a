"""What `eval` and `bench` measure with, declared once (as `conversion/settings.py` declares fit, train and calibrate):
the command-line flags and the release manifest's `eval` keys are derived from these fields."""

from __future__ import annotations

from dataclasses import dataclass

from modification.conversion.settings import DataSettings, setting


@dataclass
class EvalSettings(DataSettings):
    """What `modification eval` measures (see `evaluation/quality.py` and `evaluation/tasks.py`)."""

    split: str = setting("test", "split of a datasets source")
    context_lengths: list[int] = setting([1024], "context lengths for perplexity")
    stride: int | None = setting(None, "sliding-window stride in tokens (default: context / 2)")
    max_tokens: int | None = setting(None, "use at most this many tokens of each dataset")
    tasks: list[str] | None = setting(None, "lm-eval tasks (names, globs or YAML files)")
    tasks_path: list[str] = setting([], "folder or YAML file of local lm-eval tasks (repeatable)", action="append")
    limit: float | None = setting(None, "lm-eval: examples per task (>= 1) or fraction of them (< 1)")
    num_fewshot: int | None = setting(None, "lm-eval: few-shot examples")
    tasks_batch_size: str = setting("1", "lm-eval batch size (an integer or auto)")

    def validate(self) -> None:
        if not self.data and not self.tasks:
            raise ValueError("nothing to evaluate: give --data (perplexity) and/or --tasks (lm-eval)")
        if any(n < 2 for n in self.context_lengths):
            raise ValueError(f"context lengths must be at least 2, got {self.context_lengths}")
        if self.stride is not None and self.stride < 1:
            raise ValueError("--stride must be a positive number of tokens")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError("--max-tokens must be at least 2")
        if self.tasks_batch_size != "auto" and not self.tasks_batch_size.isdigit():
            raise ValueError(f"--tasks-batch-size must be a positive integer or auto, got {self.tasks_batch_size!r}")


@dataclass
class BenchSettings(DataSettings):
    """What `modification bench` times (see `evaluation/benchmark.py`). Without `data` the prompts are random ids."""

    split: str = setting("test", "split of a datasets source")
    lengths: list[int] = setting([1024, 4096], "prefill context lengths")
    repetitions: int = setting(5, "timed repetitions per measurement, after one warm-up")
    decode_batch_sizes: list[int] = setting([1, 4], "decode batch sizes (an empty string: no decode benchmark)")
    decode_tokens: int = setting(32, "new tokens per decode run")
    decode_prompt_length: int = setting(256, "prompt length before decoding")
    executed_fraction: float | None = setting(
        None, "calibrate thresholds on each prompt to this executed fraction first (speed at a chosen budget, e.g. "
              "for random-weight models); the results JSON is then left alone")
    threads: int | None = setting(None, "CPU threads for torch (default: torch's choice); on a machine shared with "
                                        "other jobs, 1 avoids threads waiting on each other")
    seed: int = setting(0, "random seed of the prompts")

    def validate(self) -> None:
        if not self.lengths:
            raise ValueError("--lengths needs at least one context length")
        if any(n < 1 for n in self.lengths + self.decode_batch_sizes):
            raise ValueError("lengths and decode batch sizes must be positive")
        if self.repetitions < 1 or self.decode_tokens < 1 or self.decode_prompt_length < 1:
            raise ValueError("--repetitions, --decode-tokens and --decode-prompt-length must be positive")
        if self.threads is not None and self.threads < 1:
            raise ValueError("--threads must be at least 1")
