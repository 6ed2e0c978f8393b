"""SAEBench's core metrics of a transcoder, scored on its task (y against its prediction from x):
an exact transcoder explains all of y's variance at full length, a rotated one what the hand
computation says; the firing fractions count the latents read from x."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_core.data.models import HookPoint, decoder_layers
from sae_core.evaluation.splice import SplitModel
from sae_core.evaluation.transcoder_core import transcoder_core_metrics
from tests.helpers.linear_mlp import linear_mlp_llama, skip_transcoder

HOOK_IN, HOOK_OUT, FIRST = HookPoint("mlp_in", 1), HookPoint("mlp_out", 1), 1
ALWAYS_ON = 4  # latents that fire on every token, writing nothing


@pytest.fixture(scope="module")
def model():
    return linear_mlp_llama(HOOK_OUT.layer)


@pytest.fixture(scope="module")
def contexts():
    return torch.randint(0, 512, (6, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def y(model, contexts):
    """The MLP's output on the contexts: [6, 16, 64]."""
    with torch.inference_mode():
        return SplitModel(model, HOOK_OUT).capture(contexts).act


def _metrics(model, contexts, y, weight, bias):
    tc = skip_transcoder(weight, bias)
    with torch.no_grad():
        tc.b_enc[:ALWAYS_ON] = 1e4  # they fire, and their zero decoder rows change nothing
        tc.W_dec[:ALWAYS_ON] = 0
    # 4 contexts a batch: two batches, the second short.
    return transcoder_core_metrics(tc, model, contexts, y, HOOK_IN, FIRST, 4, decoder_sample=50)


def test_an_exact_transcoder_explains_all_of_y_at_full_length(model, contexts, y):
    mlp = decoder_layers(model)[1].mlp
    got = _metrics(model, contexts, y, mlp.weight, mlp.bias)
    assert got["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert got["cossim"] == pytest.approx(1.0, abs=1e-6)
    assert got["l2_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert got["alive_fraction"] == got["latents_over_10pct"] == ALWAYS_ON / 128
    assert got["decoder_cosine_sample"] == 50


def test_a_rotated_transcoder_scores_what_the_hand_computation_says(model, contexts, y):
    mlp = decoder_layers(model)[1].mlp
    # The map's output coordinates rotated by one: y_hat = roll(y), the same length.
    got = _metrics(model, contexts, y, mlp.weight.roll(1, dims=0), mlp.bias.roll(1))
    flat = y[:, FIRST:].reshape(-1, 64).double()
    rolled = flat.roll(1, dims=1)
    fvu = float((rolled - flat).pow(2).sum() / (flat - flat.mean(0)).pow(2).sum())
    assert got["explained_variance"] == pytest.approx(1 - fvu, rel=1e-4)
    assert got["cossim"] == pytest.approx(float(F.cosine_similarity(flat, rolled).mean()), rel=1e-4)
    assert got["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert got["explained_variance"] < 0.9
