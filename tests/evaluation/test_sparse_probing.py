"""k-sparse probing on synthetic labels: one latent that separates the classes is found at k=1."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.evaluation.metrics import balanced_accuracy, f1_score, fit_logistic
from sae_core.evaluation.probe_data import POS_CLASSES, ProbeSet
from sae_core.evaluation.sparse_probing import (
    probe_accuracy,
    sparse_probing,
    sparse_probing_summary,
    top_mean_difference,
)
from sae_core.sae import TopKSAE


def _identity_sae(d: int) -> TopKSAE:
    """Every coordinate its own latent (ReLU of it), all kept: codes = relu(x)."""
    sae = TopKSAE(d, SAEConfig(n_latents=d, k=d, normalize="none"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae.eval()


def _probe_set(d: int = 12, contexts: int = 80, positions: int = 6) -> ProbeSet:
    """Two genres; coordinate 3 is 1 on genre "b" contexts and 0 on "a" ones (the rest is
    noise); at token level coordinate 5 is 1 exactly on nouns."""
    g = torch.Generator().manual_seed(0)
    genre = torch.arange(contexts) % 2
    acts = torch.rand(contexts, positions, d, generator=g) * 0.5
    acts[..., 3] = genre[:, None].float()
    pos = torch.randint(0, len(POS_CLASSES), (contexts, positions), generator=g)
    acts[..., 5] = (pos == 0).float()  # 0: noun
    train = torch.arange(contexts) < contexts // 2
    token_sample = torch.cartesian_prod(torch.arange(contexts), torch.arange(positions))
    return ProbeSet(acts, genre, pos, train, token_sample, ["a", "b"])


def test_one_separating_latent_gives_accuracy_one_at_k1():
    results = sparse_probing(_identity_sae(12), _probe_set(), ks=(1, 2))
    by = {(r.task, r.k): r for r in results}
    assert by[("genre=b", 1)].latents == [3] and by[("genre=b", 1)].accuracy == 1.0
    assert by[("pos=noun", 1)].latents == [5] and by[("pos=noun", 1)].accuracy == 1.0
    summary = sparse_probing_summary(results)
    assert set(summary) == {"sparse_probe_acc_k1", "sparse_probe_acc_k2"}


def test_noise_labels_score_near_chance():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2000, 20, generator=g)
    y = (torch.rand(2000, generator=g) < 0.3).double()
    acc, latents = probe_accuracy(x[:1000], y[:1000], x[1000:], y[1000:], 1)
    assert len(latents) == 1 and abs(acc - 0.5) < 0.06


def test_top_mean_difference_ranks_by_absolute_gap():
    y = torch.tensor([1.0, 1.0, 0.0, 0.0])
    x = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [2.0, 4.0, 1.0], [2.0, 4.0, 1.0]])
    assert top_mean_difference(x, y, 2).tolist() == [0, 1]  # gaps -2, +1, 0


def test_logistic_fit_separates_and_weighs_a_rare_class():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 3, generator=g)
    y = (x[:, 0] > 1.5).double()  # ~7% positives
    fit = fit_logistic(x, y[:, None])
    predicted = fit.logits(x)[:, 0] > 0
    assert balanced_accuracy(predicted, y.bool()) > 0.95
    assert f1_score(predicted, y.bool()) > 0.8


def test_balanced_accuracy_and_f1_by_hand():
    y = torch.tensor([True, True, False, False, False, False])
    predicted = torch.tensor([True, False, False, False, False, True])
    assert balanced_accuracy(predicted, y) == pytest.approx((0.5 + 0.75) / 2)
    assert f1_score(predicted, y) == pytest.approx(2 * 1 / (2 + 2))
    assert f1_score(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) == 0.0


def test_logistic_fit_works_under_inference_mode():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    with torch.inference_mode():
        fit = fit_logistic(x, y)
    assert (fit.logits(x)[:, 0] > 0).tolist() == [False, False, True, True]
