"""Training recipes: the paper's constant rate, the budget recipe's optimiser, warm-up, rate rule
and encoder scale, overrides, a run's length from train.tokens, and the trainer following its
schedule."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from sae_core.config import SAEConfig, TrainConfig
from sae_core.training import recipe
from sae_core.training.group import run_training, tensor_source
from sae_core.training.recipe import paper_lr, run_steps, schedule
from tests.helpers.activations import sparse_dictionary_data


def test_paper_recipe_is_the_papers_constant_rate():
    s = schedule(TrainConfig(recipe="paper"), 4608, total_steps=64)
    assert s.peak_lr == pytest.approx(2e-4 / math.sqrt(4608 / 2**14))
    assert s.warmup_steps == 0 and s.decay == "none"
    assert (s.optimizer, s.encoder_init_scale) == ("adam", 1.0)
    assert {s.lr(step) for step in range(64)} == {s.peak_lr}


def test_budget_recipe_is_schedule_free_adam_warmed_up_then_held():
    s = schedule(TrainConfig(), 4608, total_steps=200)
    assert s.recipe == "budget" and s.warmup_steps == 10 and s.decay == "none"
    assert (s.optimizer, s.encoder_init_scale) == ("schedule_free_adam", 0.5)
    rates = [s.lr(step) for step in range(200)]
    assert rates[:10] == pytest.approx([s.peak_lr * (i + 1) / 10 for i in range(10)])
    assert rates[9:] == pytest.approx([s.peak_lr] * 191)


def test_a_linear_decay_falls_every_step_to_zero():
    s = schedule(TrainConfig(lr_decay="linear"), 4608, total_steps=200)
    rates = [s.lr(step) for step in range(200)]
    assert all(a > b for a, b in zip(rates[10:], rates[11:], strict=False))
    assert rates[-1] == pytest.approx(s.peak_lr / 190)  # one step from zero
    assert s.lr(200) == 0.0


def test_budget_rate_is_raised_for_short_runs_only():
    n = 4608
    short = schedule(TrainConfig(), n, total_steps=recipe.REFERENCE_STEPS // 4).peak_lr
    assert short == pytest.approx(2 * paper_lr(n))  # sqrt(4) x the paper's
    tiny = schedule(TrainConfig(), n, total_steps=1).peak_lr
    assert tiny == pytest.approx(recipe.MAX_BOOST * paper_lr(n))  # capped
    for steps in (recipe.REFERENCE_STEPS, 10 * recipe.REFERENCE_STEPS):
        assert schedule(TrainConfig(), n, total_steps=steps).peak_lr == pytest.approx(paper_lr(n))


def test_each_choice_can_be_overridden():
    cfg = TrainConfig(recipe="paper", lr=1e-3, lr_warmup=0.25, lr_decay="linear")
    s = schedule(cfg, 4608, total_steps=40)
    assert (s.recipe, s.peak_lr, s.warmup_steps, s.decay) == ("paper", 1e-3, 10, "linear")


def test_unknown_length_steps_with_adam_at_a_constant_rate():
    s = schedule(TrainConfig(), 4608, total_steps=None)
    assert s.decay == "none" and s.warmup_steps == 0 and s.lr(10**6) == paper_lr(4608)
    assert (s.optimizer, s.encoder_init_scale) == ("adam", 1.0)


def test_a_moving_average_is_refused_under_the_budget_recipe():
    with pytest.raises(ValidationError, match="train.ema_decay.*recipe=paper"):
        TrainConfig(ema_decay=0.9)
    assert TrainConfig(ema_decay=0.9, recipe="paper").ema_decay == 0.9


def test_run_length_from_tokens_or_epochs():
    assert run_steps(TrainConfig(batch_size=100, epochs=3), steps_per_epoch=7) == 21
    assert run_steps(TrainConfig(batch_size=100, tokens=1550), steps_per_epoch=7) == 15
    with pytest.raises(ValidationError, match="set one of them"):
        TrainConfig(tokens=8192, epochs=2)
    with pytest.raises(ValidationError, match="less than one batch"):
        TrainConfig(tokens=100, batch_size=4096)


def test_a_token_budget_run_takes_its_steps_across_passes_and_follows_its_schedule():
    x, _ = sparse_dictionary_data(1024)
    cfg = TrainConfig(batch_size=128, tokens=128 * 20, checkpoint_every_tokens=10**9)
    trainer = run_training(
        32,
        SAEConfig(n_latents=64, k=3, dead_window_tokens=512),
        cfg,
        tensor_source(x, 128, 0),
        len(x) // 128,  # 8 steps a pass: 20 steps take 3 passes, the last cut short
        lambda: x[:512],
        progress=False,
    )
    st = trainer.state
    assert (st.step, st.tokens_seen, st.epoch) == (20, 128 * 20, 3)
    expected = [trainer.schedule.lr(i) for i in range(20)]
    assert [r["lr"] for r in st.history] == pytest.approx(expected)
    assert trainer.schedule.total_steps == 20 and st.history[-1]["lr"] > 0
