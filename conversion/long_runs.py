"""What lets a training run be long: `CleanStop` (a time budget, Ctrl-C and SIGTERM end it at the end of a step, with
a checkpoint and the output), `last_complete_checkpoint` (resume from the last checkpoint the Trainer finished
writing) and `plot_held_out` (held-out quality against the tokens seen)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

logger = logging.getLogger(__name__)


class CleanStop(TrainerCallback):
    """Stops training at the end of a step, asking for a checkpoint, a log line and (where evaluation is on) an
    evaluation there, when `minutes` have passed since this run's first step or the process got SIGINT (Ctrl-C) or
    SIGTERM (a scheduler's preemption) while `catching_signals`; a second signal interrupts at once. The main
    process decides and every process follows it (a broadcast per step), so that all stop at the same step.
    `stopped_by`: "max_minutes", the signal's name, or None."""

    def __init__(self, minutes: float | None = None):
        self.seconds = None if minutes is None else minutes * 60.0
        self.start = time.monotonic()
        self.signal: str | None = None
        self.stopped_by: str | None = None

    @contextmanager
    def catching_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            yield
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum, frame):
            self.signal = signal.Signals(signum).name
            for sig, handler in previous.items():  # the next signal acts as it would have
                signal.signal(sig, handler)

        for sig in previous:
            signal.signal(sig, request_stop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        from accelerate.utils import broadcast

        over_time = self.seconds is not None and time.monotonic() - self.start >= self.seconds
        reason = 2 if self.signal is not None else int(over_time)  # the main process's, for every process
        reason = int(broadcast(torch.tensor([reason], device=args.device), from_process=0).item())
        if reason and not control.should_training_stop:
            self.stopped_by = "max_minutes" if reason == 1 else (self.signal or "signal")
            control.should_training_stop = control.should_save = control.should_log = True
            control.should_evaluate = args.eval_strategy != IntervalStrategy.NO
        return control


def last_complete_checkpoint(checkpoint_dir: Path) -> str | None:
    """The latest `checkpoint-N` folder the Trainer finished writing. The Trainer writes a checkpoint in place, with
    `trainer_state.json` last, and removes older ones (beyond `save_total_limit`) only after that: a folder without
    it is one a killed run left half-written, and the one before it is intact."""
    complete = [p for p in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if (p / TRAINER_STATE_NAME).is_file()]
    complete = [p for p in complete if p.name.split("-")[-1].isdigit()]
    return str(max(complete, key=lambda p: int(p.name.split("-")[-1]))) if complete else None


def plot_held_out(log_history: list[dict], path: Path) -> Path | None:
    """Held-out perplexity (and KL to the teacher) against training tokens, from the training log, as a PNG at `path`;
    None where there is no held-out evaluation or matplotlib (the `eval` extra) is not installed."""
    rows = [row for row in log_history if "eval_lm_loss" in row and "num_input_tokens_seen" in row]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info("matplotlib is not installed (pip install 'modification[eval]'): no plot of the held-out loss")
        return None
    tokens = [row["num_input_tokens_seen"] for row in rows]
    panels = [("eval_perplexity", "held-out perplexity")]
    if "eval_kl_loss" in rows[0]:
        panels.append(("eval_kl_loss", "held-out KL to the teacher (x T^2)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(tokens, [row[key] for row in rows], marker="o")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
