"""Input normalisation round trips and the Weiszfeld geometric median."""

from __future__ import annotations

import pytest
import torch

from sae_core.errors import ConfigError
from sae_core.sae.normalize import InputNorm, geometric_median


def _raw(n: int = 256, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g) * 7 + 3


def test_per_token_centres_and_unit_norm_and_round_trips():
    x = _raw()
    norm = InputNorm.fit("per_token", x)
    xn, stats = norm.apply(x)
    assert torch.allclose(xn.mean(dim=1), torch.zeros(len(x)), atol=1e-6)
    assert torch.allclose(xn.norm(dim=1), torch.ones(len(x)), atol=1e-5)
    assert torch.allclose(norm.invert(xn, stats), x, atol=1e-5)


def test_per_token_zero_token_stays_finite():
    x = torch.zeros(2, 8)
    xn, stats = InputNorm("per_token").apply(x)
    assert torch.isfinite(xn).all() and torch.equal(InputNorm("per_token").invert(xn, stats), x)


def test_global_scale_gives_mean_square_norm_d_and_round_trips():
    x = _raw()
    norm = InputNorm.fit("global", x)
    xn, stats = norm.apply(x)
    assert xn.pow(2).sum(dim=1).mean().item() == pytest.approx(x.shape[1], rel=1e-5)
    assert torch.allclose(norm.invert(xn, stats), x, atol=1e-4)
    assert torch.allclose(norm.invert(xn), x, atol=1e-4)  # a global constant needs no stats
    assert InputNorm.from_json(norm.to_json()) == norm


@pytest.mark.parametrize("mode", ["per_token", "global", "none"])
def test_an_offset_is_subtracted_after_normalising(mode):
    """Training passes b_pre as the offset; the stats still invert the unshifted vectors."""
    x = _raw()
    offset = torch.linspace(-1.0, 2.0, x.shape[1])
    norm = InputNorm.fit(mode, x)
    xn, stats = norm.apply(x)
    shifted, stats_shifted = norm.apply(x, offset=offset)
    torch.testing.assert_close(shifted, xn - offset, rtol=0, atol=1e-6)
    assert not torch.equal(shifted, xn)
    torch.testing.assert_close(norm.invert(shifted + offset, stats_shifted), x, atol=1e-4, rtol=0)
    assert torch.equal(stats_shifted.scale, stats.scale)


def test_per_token_invert_without_stats_is_a_clear_error():
    with pytest.raises(ConfigError, match="per_token"):
        InputNorm("per_token").invert(torch.zeros(1, 4))


def test_geometric_median_is_robust_and_stationary():
    g = torch.Generator().manual_seed(1)
    inliers = torch.randn(900, 8, generator=g) * 0.1 + 2.0
    outliers = torch.randn(100, 8, generator=g) * 0.1 + 200.0
    x = torch.cat([inliers, outliers])
    med = geometric_median(x, iters=500, tol=1e-10)
    assert (med - 2.0).abs().max() < 0.2  # the mean sits near 21.8
    # Optimality: the unit vectors from the median to the points sum to ~0.
    u = (x - med.double().float()) / (x - med).norm(dim=1, keepdim=True)
    assert u.sum(dim=0).norm() / len(x) < 1e-3
