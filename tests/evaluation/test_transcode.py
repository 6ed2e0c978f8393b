"""A transcoder spliced in place of the MLP: an exact one leaves the model as it was, an inexact
one does not, and the figures are those of the MLP's output."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import EvalConfig
from sae_core.data.models import HookPoint, decoder_layers
from sae_core.evaluation.baseline import compute_baseline
from sae_core.evaluation.evaluate import evaluate_sae
from sae_core.evaluation.splice import SplitModel
from tests.helpers.linear_mlp import linear_mlp_llama, skip_transcoder

HOOK_IN, HOOK_OUT, FIRST = HookPoint("mlp_in", 1), HookPoint("mlp_out", 1), 1
EVAL = EvalConfig(batch_contexts=4, ablation_samples=0, probe_contexts=0)


@pytest.fixture(scope="module")
def linear_mlp_model():
    return linear_mlp_llama(HOOK_OUT.layer)


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(3))


def _run(model, contexts, tc):
    split = SplitModel(model, HOOK_OUT)
    baseline = compute_baseline(split, contexts, 4, FIRST, progress=False)
    return evaluate_sae(tc, split, contexts, baseline, EVAL, FIRST, progress=False, hook_in=HOOK_IN)


def test_the_splice_of_an_exact_transcoder_is_the_clean_model(linear_mlp_model, contexts):
    mlp = decoder_layers(linear_mlp_model)[1].mlp
    metrics = _run(linear_mlp_model, contexts, skip_transcoder(mlp.weight, mlp.bias)).metrics
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], abs=1e-5)
    assert metrics["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["nmse"] < 1e-10 and metrics["eval_tokens"] == 6 * 15
    assert abs(metrics["ce_zero"] - metrics["ce_clean"]) > 1e-3  # the MLP matters


def test_an_inexact_transcoder_changes_the_model_and_its_nmse_is_of_y(linear_mlp_model, contexts):
    mlp = decoder_layers(linear_mlp_model)[1].mlp
    # The map's output coordinates rotated by one: the same energy, another direction.
    tc = skip_transcoder(mlp.weight.roll(1, dims=0), mlp.bias.roll(1))
    metrics = _run(linear_mlp_model, contexts, tc).metrics
    assert metrics["kl_spliced"] > 1e-3 and metrics["ce_spliced"] != metrics["ce_clean"]
    split = SplitModel(linear_mlp_model, HOOK_OUT)
    with torch.inference_mode():
        y = split.capture(contexts).act[:, FIRST:].reshape(-1, 64)
    expected = float((y.roll(1, dims=1) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert metrics["nmse"] == pytest.approx(expected, rel=1e-4)
