"""Two `saeflow run`s of one configuration at once: each stage is computed by one of them while
the other waits and reuses it; no output is written twice or interleaved, one model version.

Slow: `.venv/bin/pytest -m slow tests/reliability/test_concurrency.py`."""

from __future__ import annotations

import pytest

from tests.reliability.conftest import Reference, result_digests, store_problems

pytestmark = pytest.mark.slow


def test_two_runs_of_one_config_compute_each_output_once(
    new_workspace, prefect_api: str, reference: Reference
) -> None:
    ws = new_workspace("shared", prefect_api=prefect_api)
    logs = [ws.root / f"writes-{i}.txt" for i in (1, 2)]
    runs = [ws.spawn(RELIABILITY_WRITES=str(log)) for log in logs]  # started together
    outputs = [run.communicate(timeout=900)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [out[-2000:] for out in outputs]
    # Store probes (`_probe-<uuid>`) are each run's own; every other path is an output.
    first, second = (
        {path for path in log.read_text().splitlines() if not path.startswith("_probe-")}
        for log in logs
    )
    assert first | second and first & second == set(), sorted(first & second)
    assert store_problems(ws.store) == []
    [version] = ws.versions()
    assert ws.challenger() == str(version.version)
    assert result_digests(ws.store) == result_digests(reference.workspace.store)
    waited = [out for out in outputs if "another run is computing" in out]
    print(f"runs that waited for the other: {len(waited)} of 2")
