"""SAEBench's core metrics on inputs whose answers are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.evaluation.saebench_core import core_metrics, max_decoder_cosines
from sae_core.sae import TopKSAE


def _planted_sae() -> TopKSAE:
    """d=2, three latents, k=1, no normalisation: latents 0 and 1 read and write the axes;
    latent 2 never wins (zero encoder) and writes (0.6, 0.8)."""
    sae = TopKSAE(2, SAEConfig(n_latents=3, k=1, normalize="none"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae.eval()


def test_core_metrics_match_hand_computation():
    # Reconstructions keep each token's largest coordinate: (2,0), (0,1), (3,0).
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    got = core_metrics(_planted_sae(), x, decoder_sample=10)
    third = 3 / math.sqrt(10)  # cos and norm ratio of (3,1) against (3,0)
    # sum ||x - x_hat||^2 = 1; sum ||x - mean||^2 = 15 - 3 |(5/3, 2/3)|^2 = 16/3.
    assert got["explained_variance"] == pytest.approx(1 - 3 / 16)
    assert got["cossim"] == pytest.approx((2 + third) / 3)
    assert got["l2_ratio"] == pytest.approx((2 + third) / 3)
    assert got["alive_fraction"] == pytest.approx(2 / 3)  # latent 2 never fires
    assert got["latents_over_1pct"] == got["latents_over_10pct"] == pytest.approx(2 / 3)
    # Max cosine with another direction: 0.6, 0.8, 0.8.
    assert got["mean_max_decoder_cosine"] == pytest.approx(2.2 / 3)
    assert got["max_decoder_cosine"] == pytest.approx(0.8)
    assert got["decoder_cosine_sample"] == 3


def test_shrinkage_shows_in_the_l2_ratio_not_the_cosine():
    sae = _planted_sae()
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # every reconstruction at half length, same direction
    got = core_metrics(sae, torch.tensor([[2.0, 0.0], [0.0, 3.0]]), decoder_sample=10)
    assert got["l2_ratio"] == pytest.approx(0.5)
    assert got["cossim"] == pytest.approx(1.0)


def test_a_decoder_sample_is_the_full_computation_at_its_rows():
    decoder = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    full = max_decoder_cosines(decoder, sample=50)
    unit = torch.nn.functional.normalize(decoder, dim=-1)
    gram = unit @ unit.T - 3 * torch.eye(50)
    assert torch.allclose(full, gram.max(dim=1).values, atol=1e-6)
    rows = torch.randperm(50, generator=torch.Generator().manual_seed(7))[:10]
    sampled = max_decoder_cosines(decoder, sample=10, seed=7, chunk=3)
    assert torch.allclose(sampled, full[rows], atol=1e-6)
