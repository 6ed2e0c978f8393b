"""A transcoder spliced in place of the MLP: an exact one leaves the model as it was, an inexact
one does not, and the figures are those of the MLP's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_core.config import EvalConfig, SAEConfig
from sae_core.data.models import HookPoint, decoder_layers
from sae_core.evaluation.baseline import compute_baseline
from sae_core.evaluation.evaluate import evaluate_sae
from sae_core.evaluation.splice import SplitModel
from sae_core.sae import build_sae
from tests.helpers.tiny_models import build_tiny_llama

HOOK_IN, HOOK_OUT, FIRST = HookPoint("mlp_in", 1), HookPoint("mlp_out", 1), 1
EVAL = EvalConfig(batch_contexts=4, ablation_samples=0, probe_contexts=0)


@pytest.fixture(scope="module")
def linear_mlp_model():
    """The tiny Llama with block 1's MLP replaced by an affine map, y = A x + c, large enough
    that removing it changes the model's predictions."""
    model = build_tiny_llama()
    torch.manual_seed(5)
    mlp = nn.Linear(64, 64)
    with torch.no_grad():
        mlp.weight.normal_(0, 1)
    decoder_layers(model)[1].mlp = mlp
    return model.eval()


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(3))


def _run(model, contexts, tc):
    split = SplitModel(model, HOOK_OUT)
    baseline = compute_baseline(split, contexts, 4, FIRST, progress=False)
    return evaluate_sae(tc, split, contexts, baseline, EVAL, FIRST, progress=False, hook_in=HOOK_IN)


def _skip_transcoder(weight: torch.Tensor, bias: torch.Tensor):
    """A skip transcoder whose skip path is the affine map and whose latents never fire."""
    tc = build_sae(64, SAEConfig(kind="skip_transcoder", n_latents=128, k=8, normalize="none"))
    with torch.no_grad():
        tc.W_skip.copy_(weight)
        tc.b_dec.copy_(bias)
        tc.b_enc.fill_(-1e4)
    return tc.eval()


def test_the_splice_of_an_exact_transcoder_is_the_clean_model(linear_mlp_model, contexts):
    mlp = decoder_layers(linear_mlp_model)[1].mlp
    metrics = _run(linear_mlp_model, contexts, _skip_transcoder(mlp.weight, mlp.bias)).metrics
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], abs=1e-5)
    assert metrics["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["nmse"] < 1e-10 and metrics["eval_tokens"] == 6 * 15
    assert abs(metrics["ce_zero"] - metrics["ce_clean"]) > 1e-3  # the MLP matters


def test_an_inexact_transcoder_changes_the_model_and_its_nmse_is_of_y(linear_mlp_model, contexts):
    mlp = decoder_layers(linear_mlp_model)[1].mlp
    # The map's output coordinates rotated by one: the same energy, another direction.
    tc = _skip_transcoder(mlp.weight.roll(1, dims=0), mlp.bias.roll(1))
    metrics = _run(linear_mlp_model, contexts, tc).metrics
    assert metrics["kl_spliced"] > 1e-3 and metrics["ce_spliced"] != metrics["ce_clean"]
    split = SplitModel(linear_mlp_model, HOOK_OUT)
    with torch.inference_mode():
        y = split.capture(contexts).act[:, FIRST:].reshape(-1, 64)
    expected = float((y.roll(1, dims=1) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert metrics["nmse"] == pytest.approx(expected, rel=1e-4)
