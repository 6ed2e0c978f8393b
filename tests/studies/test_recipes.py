"""The recipe study: each recipe trained at each budget on the pipeline's own activations,
scored on the held-out split, saved as it goes and resumed without retraining (through
`saeflow study recipes`); sparsify's forward as the study scores it."""

from __future__ import annotations

import json

import pytest
import torch

from sae_core.studies import recipes
from sae_core.studies.recipes import sparsify_reconstruct
from tests.helpers.cli import assert_one_line_error, invoke
from tests.helpers.pipeline import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_recipe_at_each_budget_is_scored_and_kept(tiny_preset, tmp_path, monkeypatch):
    out = tmp_path / "points.json"
    args = [
        "study",
        "recipes",
        "--preset",
        tiny_preset,
        "--out",
        str(out),
        "--budgets",
        "1024,2048",
    ]
    result = invoke(*args, "--ce-contexts", "4")
    assert result.exit_code == 0, result.output
    points = json.loads(out.read_text())
    assert [(p["trainer"], p["budget"], p["steps"]) for p in points] == [
        ("paper", 1024, 4),
        ("budget", 1024, 4),
        ("paper", 2048, 8),
        ("budget", 2048, 8),
    ]
    for p in points:
        assert 0 < p["fvu"] < 1.5 and 0 < p["nmse"] < 1.5 and p["tokens"] == p["budget"]
        # per_token is the preset's normalisation: the per-token NMSE is the SAE's own nmse
        assert p["nmse_per_token"] == pytest.approx(p["nmse"], rel=1e-4)
    assert points[3]["peak_lr"] > points[2]["peak_lr"]  # short runs step larger under budget
    assert "budget      2048 tokens" in result.output
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the frontier plot

    def no_training(*args, **kwargs):
        raise AssertionError("a finished point was trained again")

    monkeypatch.setattr(recipes, "train_recipe", no_training)
    assert invoke(*args, "--ce-contexts", "4").exit_code == 0
    assert json.loads(out.read_text()) == points


def test_bad_study_arguments_are_one_line(tiny_preset, tmp_path):
    out = str(tmp_path / "p.json")
    base = ["study", "recipes", "--preset", tiny_preset, "--out", out]
    assert_one_line_error(invoke(*base, "--recipes", "adam"), "--recipes", "paper, budget")
    assert_one_line_error(invoke(*base, "--budgets", "1,x"), "--budgets")
    assert_one_line_error(invoke(*base, "--sparsify-python", "/nope"), "--sparsify-python")
    assert_one_line_error(invoke("study", "precision", "--dtype", "float16"), "--dtype")


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


def test_the_scorer_measures_ce_as_the_model_does(tiny_llama_dir, tiny_corpus_dir, tmp_path):
    from sae_core.data.models import load_model
    from sae_core.evaluation.metrics import next_token_ce
    from sae_core.stages.extract import extract_activations
    from sae_core.stages.sample import sample_tokens
    from sae_core.studies.recipes import Scorer

    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, str(tmp_path / "store"))
    tokens = sample_tokens(config.store, config.model, config.data, progress=False)
    acts = extract_activations(tokens, config.model, config.data, progress=False)
    model = load_model(str(tiny_llama_dir), "float32", "cpu").model
    scorer = Scorer(acts, model, ce_contexts=6, batch=4)
    ids = scorer.contexts
    with torch.inference_mode():
        direct = float(next_token_ce(model(input_ids=ids).logits, ids, 1))
    assert scorer.ce_clean == pytest.approx(direct / (ids.shape[0] * (ids.shape[1] - 2)), rel=1e-5)
    # An exact reconstruction scores the clean CE, the zero vector the zero ablation's.
    zero = scorer.baseline.ce_sums["zero"] / scorer.baseline.terms
    assert scorer.spliced_ce(lambda x: x) == pytest.approx(scorer.ce_clean, rel=1e-6)
    assert scorer.spliced_ce(torch.zeros_like) == pytest.approx(zero, rel=1e-5)
