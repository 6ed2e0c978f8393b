import math

import pytest
import torch

from sae_core.metrics import (
    DownstreamStats,
    ReconstructionStats,
    ce_loss_recovered,
    next_token_ce,
    normalized_mse,
)


def test_nmse_is_zero_for_perfect_and_one_for_the_mean():
    x = torch.randn(100, 8)
    assert normalized_mse(x, x) == 0
    assert math.isclose(normalized_mse(x, x.mean(0, keepdim=True).expand_as(x)), 1.0, rel_tol=1e-6)


def test_streaming_stats_match_the_batch_formula():
    torch.manual_seed(0)
    x = torch.randn(300, 16) + 3
    x_hat = x + 0.1 * torch.randn_like(x)
    idx = torch.randint(0, 10, (300, 4))
    vals = torch.rand(300, 4)
    vals[:, 3] = 0  # a selected latent with value 0 does not fire
    stats = ReconstructionStats(n_latents=12)
    for lo in range(0, 300, 64):
        stats.update(x[lo : lo + 64], x_hat[lo : lo + 64], idx[lo : lo + 64], vals[lo : lo + 64])
    out = stats.result()
    assert math.isclose(out["nmse"], normalized_mse(x, x_hat), rel_tol=1e-6)
    assert out["l0"] == 3.0
    fired = set(idx[:, :3].flatten().tolist())
    assert out["dead_fraction"] == pytest.approx((12 - len(fired)) / 12)  # 10, 11 never selected


def test_ce_recovered_endpoints():
    assert ce_loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert ce_loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert ce_loss_recovered(2.0, 3.5, 5.0) == 0.5
    assert math.isnan(ce_loss_recovered(2.0, 3.0, 2.0))


def test_next_token_ce_skips_early_positions():
    logits = torch.zeros(2, 5, 7)
    ids = torch.zeros(2, 5, dtype=torch.long)
    logits[:, 0, 3] = 100.0  # a confident wrong prediction from position 0
    full = next_token_ce(logits, ids, first=0)
    tail = next_token_ce(logits, ids, first=1)
    assert math.isclose(float(tail), 2 * 3 * math.log(7), rel_tol=1e-5)
    assert float(full) > float(tail) + 100


def test_downstream_stats_derive_recovered_and_delta():
    stats = DownstreamStats()
    for name, ce in {"clean": 2.0, "spliced": 2.5, "zero": 6.0}.items():
        stats.update(name, torch.tensor(ce * 10), 10)
    out = stats.result()
    assert out["ce_clean"] == 2.0 and out["delta_lm_loss"] == 0.5
    assert math.isclose(out["ce_loss_recovered"], 3.5 / 4.0)
