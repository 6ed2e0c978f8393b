"""Every metric on inputs whose answer is known."""

import math

import numpy as np
import pytest
import torch

from sae_core.evaluation.metrics import (
    DownstreamStats,
    ReconstructionStats,
    VarianceStats,
    ablation_sparsity,
    best_single_latent_probe,
    binary_ce,
    ce_loss_recovered,
    density_histogram,
    fit_logistic_1d,
    latent_density,
    next_token_ce,
    next_token_kl,
    standardize,
    unexplained_variance,
)
from sae_core.studies.scaling import NAMES, fit_scaling_law, scaling_law


def test_unexplained_variance_is_zero_for_perfect_and_one_for_the_mean():
    x = torch.randn(100, 8)
    assert unexplained_variance(x, x) == 0
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert math.isclose(unexplained_variance(x, mean), 1.0, rel_tol=1e-6)


def test_variance_stats_stream_to_the_batch_formula():
    torch.manual_seed(0)
    x = torch.randn(300, 16) * 3 + 50  # far from 0: the running sums must not cancel
    x_hat = x + 0.1 * torch.randn_like(x)
    stats = VarianceStats()
    for lo in range(0, 300, 64):
        stats.update(x[lo : lo + 64], x_hat[lo : lo + 64])
    assert math.isclose(stats.result(), unexplained_variance(x, x_hat), rel_tol=1e-6)


def test_reconstruction_stats_separate_spaces_l0_and_dead_latents():
    torch.manual_seed(0)
    x = torch.randn(300, 16) + 3
    x_hat = x + 0.1 * torch.randn_like(x)
    x_norm = torch.randn(300, 16)
    recon_norm = x_norm + 0.3 * torch.randn_like(x_norm)
    idx = torch.randint(0, 10, (300, 4))
    vals = torch.rand(300, 4) + 0.01
    vals[:, 3] = 0  # a selected latent with value 0 does not fire
    stats = ReconstructionStats(n_latents=12)
    for lo in range(0, 300, 64):
        s = slice(lo, lo + 64)
        stats.update(x[s], x_hat[s], x_norm[s], recon_norm[s], idx[s], vals[s])
    out = stats.result()
    assert math.isclose(out["fvu"], unexplained_variance(x, x_hat), rel_tol=1e-6)
    assert math.isclose(out["nmse"], unexplained_variance(x_norm, recon_norm), rel_tol=1e-6)
    assert out["l0"] == 3.0 and out["eval_tokens"] == 300
    fired = set(idx[:, :3].flatten().tolist())
    assert out["dead_fraction"] == pytest.approx((12 - len(fired)) / 12)  # 10, 11 never selected
    assert stats.histogram().dead == 12 - len(fired)


def test_density_histogram_bins_log_density_and_counts_dead_apart():
    counts = torch.tensor([0, 1, 50, 100, 100])
    density = latent_density(counts, tokens=100)
    assert density.tolist() == [0.0, 0.01, 0.5, 1.0, 1.0]
    hist = density_histogram(density, tokens=100)
    assert hist.dead == 1
    assert hist.edges[0] == -2.0 and hist.edges[-1] == 0.0 and len(hist.counts) == 20
    assert hist.counts[0] == 1  # density 1/100: the lowest bin
    assert hist.counts[16] == 1  # log10(0.5) = -0.30
    assert hist.counts[-1] == 2  # density 1 falls in the closed last bin
    assert sum(hist.counts) == 4


def test_next_token_ce_skips_early_positions():
    logits = torch.zeros(2, 5, 7)
    ids = torch.zeros(2, 5, dtype=torch.long)
    logits[:, 0, 3] = 100.0  # a confident wrong prediction from position 0
    full = next_token_ce(logits, ids, first=0)
    tail = next_token_ce(logits, ids, first=1)
    assert math.isclose(float(tail), 2 * 3 * math.log(7), rel_tol=1e-5)
    assert float(full) > float(tail) + 100


def test_next_token_kl_known_value_and_positions():
    ref = torch.zeros(1, 3, 2)  # p = (1/2, 1/2) everywhere
    other = torch.zeros(1, 3, 2)
    other[0, :, 0] = math.log(3.0)  # q = (3/4, 1/4)
    other[0, 2] = 50.0  # the last position predicts nothing scored: ignored
    per_position = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert math.isclose(float(next_token_kl(ref, other)), 2 * per_position, rel_tol=1e-5)
    assert math.isclose(float(next_token_kl(ref, other, first=1)), per_position, rel_tol=1e-5)
    assert float(next_token_kl(ref, ref)) == pytest.approx(0.0, abs=1e-7)


def test_ce_recovered_endpoints():
    assert ce_loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert ce_loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert ce_loss_recovered(2.0, 3.5, 5.0) == 0.5
    assert math.isnan(ce_loss_recovered(2.0, 3.0, 2.0))


def test_downstream_stats_derive_recovered_delta_and_kl():
    stats = DownstreamStats()
    stats.add("clean", 2.0 * 10, 10)
    stats.add("spliced", 2.5 * 10, 10, kl_sum=0.3 * 10)
    stats.add("zero", 6.0 * 40, 40)  # a baseline summed elsewhere, over more batches
    stats.add("mean", 3.0 * 40, 40)
    out = stats.result()
    assert out["ce_clean"] == 2.0 and out["delta_lm_loss"] == 0.5
    assert math.isclose(out["ce_loss_recovered"], 3.5 / 4.0)
    assert math.isclose(out["ce_loss_recovered_mean"], 0.5)
    assert math.isclose(out["kl_spliced"], 0.3)


def test_ablation_sparsity_counts_effective_logits():
    T, V = 4, 8
    one = torch.zeros(1, T, V)
    one[0, 1, 3] = 5.0
    assert float(ablation_sparsity(one)[0]) == pytest.approx(1 / (T * V))
    two = torch.zeros(1, T, V)
    two[0, 0, 0], two[0, 2, 5] = 1.0, -1.0
    assert float(ablation_sparsity(two)[0]) == pytest.approx(2 / (T * V))
    # A shift common to a position's logits changes no probability: it does not count.
    shifted = one + torch.arange(T, dtype=torch.float32)[None, :, None]
    assert float(ablation_sparsity(shifted)[0]) == pytest.approx(1 / (T * V))
    flat = torch.randn(3, T, V)
    values = ablation_sparsity(flat)
    assert values.shape == (3,) and bool(((values > 0) & (values <= 1)).all())


def test_logistic_newton_meets_the_optimality_conditions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 3, generator=g, dtype=torch.float64)
    y = (
        torch.rand(5000, generator=g, dtype=torch.float64) < torch.sigmoid(2 * x[:, 0] - 1)
    ).double()
    l2 = 1e-4
    w, b = fit_logistic_1d(x, y, l2=l2)
    assert abs(float(w[0]) - 2) < 0.2 and abs(float(b[0]) + 1) < 0.15
    r = torch.sigmoid(x * w + b) - y[:, None]
    assert float(r.mean(0).abs().max()) < 1e-6  # d/db = 0
    assert float(((r * x).mean(0) + l2 * w).abs().max()) < 1e-6  # d/dw = 0


def test_best_single_latent_probe_finds_the_planted_latent():
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(800, generator=g) < 0.3).double()
    x = torch.randn(800, 50, generator=g)
    x[:, 17] += 3 * y.float()  # latent 17 carries the label
    train = torch.arange(800) < 400
    fit_x, test_x = standardize(x[train], x[~train])
    fit = best_single_latent_probe(fit_x, y[train], test_x, y[~train], candidates=8)
    assert fit.latent == 17
    assert fit.loss < 0.5 * fit.baseline_loss
    rate = float(y[train].mean())
    logit = torch.full((400, 1), math.log(rate / (1 - rate)), dtype=torch.float64)
    assert fit.baseline_loss == pytest.approx(float(binary_ce(logit, y[~train])))


def test_scaling_fit_recovers_a_known_law():
    truth = (-0.3, 0.2, -0.05, -0.03, -1.5, -0.1)
    n = np.array([1152, 2304, 4608] * 3)
    k = np.repeat([16, 32, 64], 3)
    fit = fit_scaling_law(n.tolist(), k.tolist(), scaling_law(truth, n, k).tolist(), starts=2)
    assert fit.rmse_log < 1e-6 and fit.points == 9
    assert fit.loo_rel_err is not None and fit.loo_rel_err < 1e-3
    predicted = scaling_law([fit.params[p] for p in NAMES], np.array([9216]), np.array([128]))
    assert predicted[0] == pytest.approx(
        scaling_law(truth, np.array([9216]), np.array([128]))[0], rel=0.05
    )
