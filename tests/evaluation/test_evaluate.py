"""Evaluation on a tiny random Llama: the shared-lower-part figures equal plain full forwards."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import EvalConfig, SAEConfig
from sae_core.data.models import forward_with_replacement
from sae_core.evaluation.ablation import latent_contributions, sample_ablation_sparsity
from sae_core.evaluation.baseline import baseline_bytes, baseline_from, compute_baseline, with_tail
from sae_core.evaluation.evaluate import evaluate_sae
from sae_core.evaluation.metrics import ablation_sparsity, ce_loss_recovered, next_token_ce
from sae_core.evaluation.splice import SplitModel
from sae_core.sae import TopKSAE
from tests.helpers.tiny_models import build_tiny_llama

HOOK, FIRST = "resid_post.1", 1


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama()


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return TopKSAE(64, SAEConfig(n_latents=128, k=8)).eval()


@pytest.fixture(scope="module")
def baseline(model, contexts):
    return compute_baseline(SplitModel(model, HOOK), contexts, 4, FIRST, progress=False)


def _mean_ce(model, contexts, replace):
    with torch.inference_mode():
        logits = forward_with_replacement(model, contexts, HOOK, replace)
    return float(next_token_ce(logits, contexts, FIRST)) / (contexts.shape[0] * (16 - 1 - FIRST))


def test_baseline_ablations_equal_full_forwards(model, contexts, baseline):
    terms = baseline.terms
    assert terms == 6 * 14
    zero = _mean_ce(model, contexts, lambda h: with_tail(h, FIRST, 0.0))
    assert baseline.ce_sums["zero"] / terms == pytest.approx(zero, rel=1e-5)
    mean = baseline.act[:, FIRST:].reshape(-1, 64).mean(0)
    assert _mean_ce(model, contexts, lambda h: with_tail(h, FIRST, mean)) == pytest.approx(
        baseline.ce_sums["mean"] / terms, rel=1e-5
    )
    again = baseline_from(baseline_bytes(baseline), baseline.ce_sums, terms)
    assert torch.equal(again.act, baseline.act) and again.block_input is None


def test_evaluation_equals_the_plain_forward(model, contexts, baseline, sae):
    cfg = EvalConfig(batch_contexts=4, ablation_samples=10, ablation_horizon=4)
    result = evaluate_sae(
        sae, SplitModel(model, HOOK), contexts, baseline, cfg, FIRST, progress=False
    )
    m = result.metrics
    clean = _mean_ce(model, contexts, None)

    def splice(h):
        x = h[:, FIRST:].reshape(-1, 64)
        return with_tail(h, FIRST, sae.reconstruct(x).reshape(h.shape[0], -1, 64))

    assert m["ce_clean"] == pytest.approx(clean, rel=1e-5)
    assert m["ce_spliced"] == pytest.approx(_mean_ce(model, contexts, splice), rel=1e-5)
    assert m["delta_lm_loss"] == pytest.approx(m["ce_spliced"] - m["ce_clean"])
    assert m["kl_spliced"] > 0 and m["nmse"] > 0 and m["fvu"] > 0
    assert m["l0"] <= 8 and m["eval_tokens"] == 6 * 15
    for key, ablated in (("ce_loss_recovered", "ce_zero"), ("ce_loss_recovered_mean", "ce_mean")):
        expected = ce_loss_recovered(m["ce_clean"], m["ce_spliced"], m[ablated])
        assert m[key] == pytest.approx(expected, nan_ok=True)  # nan: a random LM gains by ablation
    assert len(result.ablation_sparsity) == 10
    assert all(0 < v <= 1 for v in result.ablation_sparsity)
    assert sum(result.density.counts) + result.density.dead == 128
    phases = {"lm above hook: clean", "lm above hook: spliced", "ablation sparsity"}
    assert phases <= set(result.seconds)


def test_latent_contributions_add_up_to_the_reconstruction(sae):
    x = torch.randn(64)
    latents, contrib = latent_contributions(sae, x)
    codes = sae.encode(x[None])
    assert latents.numel() == int((codes.vals > 0).sum())
    empty = sae.decode(codes.idx, torch.zeros_like(codes.vals), codes.stats)
    torch.testing.assert_close(
        sae.reconstruct(x[None])[0] - contrib.sum(0), empty[0], rtol=1e-4, atol=1e-4
    )


def test_ablation_rows_equal_an_edited_full_forward(model, contexts, baseline, sae):
    """The first ablation's logit change, recomputed with a plain forward."""
    split = SplitModel(model, HOOK)
    values = sample_ablation_sparsity(
        split, sae, contexts, baseline, FIRST, samples=1, horizon=4, seed=5, progress=False
    )
    # The same draw as the sampler's: seeded order over (context, position) pairs.
    last = 16 - 4
    flat = int(
        torch.randperm(6 * (last - FIRST + 1), generator=torch.Generator().manual_seed(5))[0]
    )
    c, p = divmod(flat, last - FIRST + 1)
    p += FIRST
    _, contrib = latent_contributions(sae, baseline.act[c, p])
    ids = contexts[c : c + 1, : p + 4]

    def ablate(h):
        h = h.clone()
        h[0, p] -= contrib[0]
        return h

    with torch.inference_mode():
        diff = forward_with_replacement(model, ids, HOOK, ablate) - model(input_ids=ids).logits
    assert float(values[0]) == pytest.approx(float(ablation_sparsity(diff[:, -4:])[0]), rel=1e-4)
