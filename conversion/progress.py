"""Progress bars of the libraries the steps call (transformers' "Loading weights", huggingface_hub's downloads),
switched with the step's own `progress` setting, so that `--no-progress` silences every bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def library_progress_bars(enabled: bool) -> Iterator[None]:
    """Within the block, transformers' and huggingface_hub's progress bars are on (`enabled`) or off; restored after."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging as hf_logging

    was_transformers, was_hub = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    if not enabled:
        hf_logging.disable_progress_bar()
        disable_progress_bars()
    try:
        yield
    finally:
        if was_transformers and not enabled:
            hf_logging.enable_progress_bar()
        if was_hub and not enabled:
            enable_progress_bars()
