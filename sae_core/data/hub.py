"""The Hugging Face libraries without their own progress bars where saeflow shows its own (or
was asked for none: `--no-progress`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sae_core.env import hub_offline


@contextmanager
def transformers_bars_off(off: bool = True) -> Iterator[None]:
    """Within the block, transformers draws no progress bar (loading weights, converting) when
    `off`; its setting comes back after. Process-wide: transformers keeps one flag."""
    hub_offline()
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    if off:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
