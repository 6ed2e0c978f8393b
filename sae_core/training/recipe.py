"""Training recipes: the learning rate, its warm-up and its decay for a run of known length.

- `paper`: Gao et al. (2024) exactly: Adam at 2e-4 / sqrt(n / 2^14), constant, no warm-up or
  decay. Their rule is tuned for runs of many thousands of steps.
- `budget` (the default): the same Adam step scaled to the run's length, warmed up linearly over
  the first `BUDGET_WARMUP` of the steps and decayed linearly to zero by the last. A short run
  takes larger steps: the peak rate is the paper's times sqrt(REFERENCE_STEPS / steps), capped
  at MAX_BOOST x the paper's rate, so a run of REFERENCE_STEPS steps or more peaks at the
  paper's own rate. (Measured in docs/results/recipes/: see README there.)

train.lr, train.lr_warmup and train.lr_decay override the recipe's choices one by one.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from sae_core.config import TrainConfig

BUDGET_WARMUP = 0.05  # fraction of the steps
REFERENCE_STEPS = 2**14
MAX_BOOST = 16.0


class Schedule(NamedTuple):
    """The learning rate of every step of one run."""

    recipe: str
    """train.recipe."""
    peak_lr: float
    """The rate after warm-up (and before any decay)."""
    warmup_steps: int
    """Steps over which the rate rises linearly to peak_lr."""
    decay: Literal["none", "linear"]
    """none: peak_lr to the end; linear: down to zero at the last step."""
    total_steps: int
    """Optimiser steps in the run."""

    def lr(self, step: int) -> float:
        """The rate of optimiser step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.decay == "linear":
            remaining = self.total_steps - step
            return self.peak_lr * max(remaining, 0) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak_lr


def paper_lr(n_latents: int) -> float:
    """Gao et al.: 2e-4 / sqrt(n / 2^14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


def budget_lr(n_latents: int, total_steps: int) -> float:
    """The budget recipe's peak rate: the paper's, raised for runs shorter than REFERENCE_STEPS."""
    boost = math.sqrt(REFERENCE_STEPS / max(total_steps, 1))
    return paper_lr(n_latents) * min(max(boost, 1.0), MAX_BOOST)


def run_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Optimiser steps in the run: train.tokens // train.batch_size, else train.epochs passes."""
    if cfg.tokens is not None:
        return cfg.tokens // cfg.batch_size
    return cfg.epochs * steps_per_epoch


def schedule(cfg: TrainConfig, n_latents: int, total_steps: int | None) -> Schedule:
    """The run's schedule: train.recipe's choices, each overridden where train sets it.

    total_steps None: a run of unknown length (benchmarks, tests stepping by hand) steps at
    train.lr, else the paper's rate, throughout."""
    if total_steps is None:
        return Schedule(cfg.recipe, cfg.lr or paper_lr(n_latents), 0, "none", 0)
    if cfg.recipe == "paper":
        lr, warmup, decay = paper_lr(n_latents), 0.0, "none"
    else:
        lr, warmup, decay = budget_lr(n_latents, total_steps), BUDGET_WARMUP, "linear"
    lr = cfg.lr if cfg.lr is not None else lr
    warmup = cfg.lr_warmup if cfg.lr_warmup is not None else warmup
    decay = cfg.lr_decay if cfg.lr_decay is not None else decay
    return Schedule(cfg.recipe, lr, round(warmup * total_steps), decay, total_steps)
