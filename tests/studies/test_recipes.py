"""The recipe study: each recipe trained at each budget on the pipeline's own activations,
scored on the held-out split, saved as it goes and resumed without retraining; sparsify's
forward as the study scores it."""

from __future__ import annotations

import json

import pytest
import torch

from sae_core.studies import recipes
from sae_core.studies.recipes import recipe_study, sparsify_reconstruct
from tests.helpers.pipeline import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_recipe_at_each_budget_is_scored_and_kept(
    tiny_llama_dir, tiny_corpus_dir, tmp_path, monkeypatch
):
    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, str(tmp_path / "store"))
    out = tmp_path / "points.json"
    points = recipe_study(config, [1024, 2048], ["paper", "budget"], out, ce_contexts=4)
    assert [(p.trainer, p.budget, p.steps) for p in points] == [
        ("paper", 1024, 4),
        ("budget", 1024, 4),
        ("paper", 2048, 8),
        ("budget", 2048, 8),
    ]
    for p in points:
        assert 0 < p.fvu < 1.5 and 0 < p.nmse < 1.5 and p.tokens == p.budget
    paper, budget = points[2], points[3]
    assert budget.peak_lr > paper.peak_lr  # short runs step larger under the budget recipe
    assert [p["trainer"] for p in json.loads(out.read_text())] == [p.trainer for p in points]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(recipes, "train_recipe", no_training)
    assert recipe_study(config, [1024, 2048], ["paper", "budget"], out, ce_contexts=4) == points


def test_sparsify_reconstruct_keeps_the_top_k_of_relu_preactivations():
    torch.manual_seed(0)
    n, d, k = 12, 5, 3
    weights = {
        "encoder.weight": torch.randn(n, d),
        "encoder.bias": torch.randn(n),
        "W_dec": torch.randn(n, d),
        "b_dec": torch.randn(d),
    }
    x = torch.randn(7, d)
    pre = torch.relu((x - weights["b_dec"]) @ weights["encoder.weight"].T + weights["encoder.bias"])
    kth = pre.topk(k, dim=1).values[:, -1:]
    z = torch.where(pre >= kth, pre, 0.0)
    expected = z @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(sparsify_reconstruct(weights, k)(x), expected)
