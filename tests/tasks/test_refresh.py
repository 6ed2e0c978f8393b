"""`--refresh`: which stages recompute, decided in plain Python before any task runs."""

from __future__ import annotations

import pytest

from sae_core.errors import ConfigError
from sae_core.storage.refs import DatasetRef
from tasks.refresh import Refresh, checked_stages

STAGES = ("sample_tokens", "extract_activations", "validate", "train_sae", "evaluate_sae")


def _ref(path: str) -> DatasetRef:
    return DatasetRef(store="/s", path=path, fingerprint=path.split("/")[1])


def _plan(named: set[str]) -> list[str]:
    """The stages of a pipeline-shaped chain a run with `--refresh named` recomputes."""
    refresh = Refresh(checked_stages(named, STAGES))
    tokens, acts, sae = _ref("tokens/t"), _ref("activations/a"), _ref("sae/s")
    calls = [
        ("sample_tokens", {"store": "/s"}, tokens),
        ("extract_activations", {"tokens": tokens, "model": "m"}, acts),
        ("validate", {"ref": acts}, {"passed": True}),
        ("train_sae", {"acts": acts}, sae),
        ("evaluate_sae", {"sae": sae, "tokens": tokens}, _ref("eval/e")),
    ]
    ran = []
    for stage, inputs, output in calls:
        if refresh.wants(stage, inputs):
            ran.append(stage)
            refresh.recomputed(output)
    return ran


def test_nothing_named_recomputes_nothing():
    assert _plan(set()) == []


def test_a_stage_recomputes_with_every_stage_reading_its_output():
    assert _plan({"extract_activations"}) == [
        "extract_activations",
        "validate",
        "train_sae",
        "evaluate_sae",
    ]
    assert _plan({"sample_tokens"}) == list(STAGES)


def test_stages_that_do_not_read_a_recomputed_output_are_kept():
    assert _plan({"validate"}) == ["validate"]  # training reads the activations, not the report
    assert _plan({"train_sae"}) == ["train_sae", "evaluate_sae"]


def test_all_names_every_stage():
    assert checked_stages(["all"], STAGES) == frozenset(STAGES)
    assert _plan({"all"}) == list(STAGES)


def test_an_unknown_stage_is_refused_naming_the_choices():
    with pytest.raises(
        ConfigError,
        match=r"--refresh train: no such stage; choose from sample_tokens, .*evaluate_sae or all",
    ):
        checked_stages(["train"], STAGES)
