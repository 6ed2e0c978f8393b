"""Training recipes: the optimiser, the learning rate, its warm-up and its decay for a run of
known length, and the encoder's scale at initialisation.

- `paper`: Gao et al. (2024) exactly: Adam at 2e-4 / sqrt(n / 2^14), constant, no warm-up or
  decay, the encoder the decoder's transpose. Their rule is tuned for runs of many thousands
  of steps.
- `budget` (the default): schedule-free Adam (`schedule_free`), whose averaged weights are the
  trained SAE, at the paper's rate scaled to the run's length: the peak rate is the paper's
  times sqrt(REFERENCE_STEPS / steps), capped at MAX_BOOST x, warmed up linearly over the first
  BUDGET_WARMUP of the steps and held (the average replaces the decay). The encoder starts as
  the decoder's transpose times BUDGET_ENCODER_SCALE: the tied init's reconstruction overshoots
  (its least-squares scale was 0.71 on the demo's data), and a large first code slows the
  short runs this recipe is for. Measured in docs/results/recipes/ (see README there).

Gao et al.'s method is the same under both: TopK, AuxK, the encoder tied to the decoder's
directions at initialisation, the unit-norm decoder with its gradient projected.
train.lr, train.lr_warmup and train.lr_decay override the recipe's choices one by one.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from sae_core.config import TrainConfig

BUDGET_WARMUP = 0.05  # fraction of the steps
BUDGET_ENCODER_SCALE = 0.5
REFERENCE_STEPS = 2**14
MAX_BOOST = 16.0

Optimizer = Literal["adam", "schedule_free_adam"]


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
    optimizer: Optimizer = "adam"
    """adam: torch's Adam; schedule_free_adam: sae_core.training.schedule_free."""
    encoder_init_scale: float = 1.0
    """The encoder at initialisation: the decoder's transpose times this."""

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

    total_steps None: a run of unknown length (benchmarks, tests stepping by hand) steps with
    Adam at train.lr, else the paper's rate, throughout."""
    if total_steps is None:
        return Schedule(cfg.recipe, cfg.lr or paper_lr(n_latents), 0, "none", 0)
    if cfg.recipe == "paper":
        lr, warmup, decay = paper_lr(n_latents), 0.0, "none"
        optimizer, encoder_scale = "adam", 1.0
    else:
        lr, warmup, decay = budget_lr(n_latents, total_steps), BUDGET_WARMUP, "none"
        optimizer, encoder_scale = "schedule_free_adam", BUDGET_ENCODER_SCALE
    lr = cfg.lr if cfg.lr is not None else lr
    warmup = cfg.lr_warmup if cfg.lr_warmup is not None else warmup
    decay = cfg.lr_decay if cfg.lr_decay is not None else decay
    return Schedule(
        cfg.recipe, lr, round(warmup * total_steps), decay, total_steps, optimizer, encoder_scale
    )
