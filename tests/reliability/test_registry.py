"""The `challenger` alias across two state directories (two SAEFLOW_HOME / PREFECT_HOME, so two
Prefect caches) on one store and one registry: the alias follows the registry, never a cache.

Slow (four `saeflow run`s in subprocesses): `.venv/bin/pytest -m slow tests/reliability/test_registry.py`."""

from __future__ import annotations

import re

import pytest

from tests.helpers.pipeline import ALL_STAGES
from tests.reliability.conftest import MODEL_NAME

pytestmark = pytest.mark.slow


def _stage_outcomes(output: str) -> dict[str, str]:
    """The stage table of a run's summary: stage -> outcome."""
    rows = re.findall(r"^│ (\w+)\s+│ ([^│]+?)\s+│$", output, flags=re.MULTILINE)
    return {stage: outcome for stage, outcome in rows if stage in ALL_STAGES}


def test_the_alias_across_two_state_directories_follows_the_registry(
    new_workspace, prefect_api: str, tmp_path
) -> None:
    import mlflow

    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    shared = {"store": str(tmp_path / "store"), "prefect_api": prefect_api}
    a = new_workspace("a", env={"MLFLOW_TRACKING_URI": registry}, **shared)
    b = new_workspace("b", env={"MLFLOW_TRACKING_URI": registry}, **shared)
    client = mlflow.MlflowClient(registry)

    def challenger() -> str:
        return str(client.get_model_version_by_alias(MODEL_NAME, "challenger").version)

    def run(ws, *overrides: str) -> str:
        code, output = ws.run(*overrides)
        assert code == 0, output[-3000:]
        return output

    run(a)  # k=8: version 1
    assert challenger() == "1"
    run(a, "sae.k=16")  # version 2, the newest: challenger
    assert challenger() == "2"

    # The other state directory has an empty cache: every stage runs and finds its output on
    # the store, registration finds version 1, and the alias stays on the newer version 2.
    other = run(b)
    stages = _stage_outcomes(other)
    assert stages["train_sae"] == "reused from the store", stages
    assert stages["register_model"] == "reused from the registry", stages
    assert "@challenger stays at version 2: this run's version 1 is older" in other
    assert challenger() == "2"
    assert "@challenger -> 2" in other  # the summary prints the registry

    # Moved back by hand (what the other state directory did before the fix), a fully
    # cached re-run of the newest configuration takes it back, and says so.
    client.set_registered_model_alias(MODEL_NAME, "challenger", "1")
    cached = run(a, "sae.k=16")
    assert set(_stage_outcomes(cached).values()) == {"cached"}, cached[-3000:]
    assert "@challenger moved from version 1 to 2" in cached
    assert challenger() == "2" and "@challenger -> 2" in cached
