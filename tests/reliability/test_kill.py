"""SIGKILL of `saeflow run` during extraction, training, evaluation and registration.

After every kill: each committed dataset is whole (an unfinished one is never taken for
finished) and the registry holds at most the one version. The re-run completes, training
resumes from its last checkpoint, the registry holds exactly one version, and every result
equals that of a run nothing disturbed: no data lost, none corrupted.

Slow: each run is a `saeflow` subprocess (~20-40 s on two cores).
`.venv/bin/pytest -m slow tests/reliability/test_kill.py`; RELIABILITY_SEED=N replays a
randomized loop, RELIABILITY_ROUNDS sets its length.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections import Counter
from typing import NamedTuple

import pytest

from sae_core.storage.store import Store
from tests.reliability.conftest import (
    CHECKPOINT_TOKENS,
    Reference,
    Workspace,
    result_digests,
    store_problems,
)

pytestmark = pytest.mark.slow
KILLED = -9


class Kill(NamedTuple):
    stage: str
    spec: str  # RELIABILITY_KILL for tests/helpers/pipeline_worker.py


# One deterministic point per stage (and a torn write): what each leaves behind differs.
KILLS = {
    # after shard 3's data, before its completion mark
    "extraction": Kill("extraction", "write:activations/@7"),
    # shard 2 half-written to a temporary file
    "extraction-torn-write": Kill("extraction", "torn:activations/@5"),
    # the manifest committed, the completion marks not yet removed (the random loop found it)
    "extraction-committed": Kill("extraction", "write:activations/@19"),
    # after the second checkpoint (2048 tokens)
    "training": Kill("training", "write:checkpoints/@2"),
    # the eval-set baseline written, its manifest not
    "evaluation-baseline": Kill("evaluation", "write:baseline/@1"),
    # two of the evaluation's files written, its manifest not
    "evaluation": Kill("evaluation", "write:eval/@2"),
    # the MLflow run logged, no version registered
    "registration": Kill("registration", "call:mlflow:register_model@1"),
    # the version registered, the alias not set
    "registration-alias": Kill(
        "registration", "call:mlflow.tracking.client:MlflowClient.set_registered_model_alias@1"
    ),
}


def after_a_kill(ws: Workspace) -> None:
    """What must hold whenever a run has been killed, at any point."""
    assert store_problems(ws.store, settled=False) == []
    assert len(ws.versions()) <= 1


def like_the_reference(ws: Workspace, reference: Reference) -> None:
    """What must hold once a run has completed."""
    assert store_problems(ws.store) == []
    [version] = ws.versions()
    assert ws.challenger() == str(version.version)
    assert result_digests(ws.store) == result_digests(reference.workspace.store)


def completes_like_the_reference(ws: Workspace, reference: Reference) -> None:
    code, output = ws.run()
    assert code == 0, output[-3000:]
    like_the_reference(ws, reference)


def sae_manifest(ws: Workspace) -> dict:
    store = Store(ws.store)
    [fp] = store.listdir("sae")
    return store.manifest(f"sae/{fp}")


@pytest.mark.parametrize("kill", KILLS.values(), ids=KILLS.keys())
def test_killed_stage_then_rerun_completes_and_loses_nothing(
    kill: Kill, new_workspace, prefect_api: str, reference: Reference
) -> None:
    ws = new_workspace("victim", prefect_api=prefect_api)
    code, output = ws.run(RELIABILITY_KILL=kill.spec)
    assert code == KILLED, output[-3000:]
    after_a_kill(ws)
    completes_like_the_reference(ws, reference)
    if kill.stage == "training":
        assert sae_manifest(ws)["resumed_from_tokens"] == 2 * CHECKPOINT_TOKENS


STAGES = ("extraction", "training", "evaluation", "registration")


def random_kill(rng: random.Random, stage: str) -> str:
    """A kill point drawn at random within a stage (writes counted as the tiny preset makes
    them: 19 into activations, 4 checkpoints, 2 baseline, 2 probes, 5 evaluation)."""
    if stage == "extraction":
        return f"{rng.choice(['write', 'torn'])}:activations/@{rng.randint(1, 19)}"
    if stage == "training":
        return f"{rng.choice(['write', 'torn'])}:checkpoints/@{rng.randint(1, 4)}"
    if stage == "evaluation":
        folder, writes = rng.choice([("baseline/", 2), ("probes/", 2), ("eval/", 5)])
        return f"{rng.choice(['write', 'torn'])}:{folder}@{rng.randint(1, writes)}"
    return "call:" + rng.choice(
        [
            "mlflow:start_run@1",
            "mlflow.pyfunc:log_model@1",
            "mlflow:register_model@1",
            "tasks.registry:_link_run@1",
            "mlflow.tracking.client:MlflowClient.set_registered_model_alias@1",
        ]
    )


def killed_after(ws: Workspace, seconds: float) -> int:
    """Run, SIGKILL after `seconds` unless it ended first; the exit code."""
    proc = ws.spawn()
    try:
        proc.communicate(timeout=seconds)  # reads the output meanwhile: a full pipe would block
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
    return proc.returncode


def test_random_kills_repeated_until_the_run_completes(
    new_workspace, prefect_api: str, reference: Reference
) -> None:
    """Rounds of runs armed with a random kill point in each stage not yet killed that round,
    each run dying at the first point it reaches, until one completes; every other round starts
    with a kill at a random moment (which may pass a stage by: the rounds without one kill every
    stage). Prints the tally (`-rP` shows it); RELIABILITY_SEED replays a sequence."""
    seed = int(os.environ.get("RELIABILITY_SEED", time.time_ns() % 2**32))
    rounds = int(os.environ.get("RELIABILITY_ROUNDS", "2"))
    rng = random.Random(seed)
    kills: Counter[str] = Counter()
    for round_ in range(rounds):
        ws = new_workspace(f"round-{round_}", prefect_api=prefect_api)
        if round_ % 2 == 0:
            moment = rng.uniform(2, reference.seconds)
            kills["at a random moment"] += killed_after(ws, moment) == KILLED
            after_a_kill(ws)
        fired, pending = ws.root / "fired", list(STAGES)
        while True:  # ends: each run kills in a pending stage and removes it, or completes
            armed = {random_kill(rng, stage): stage for stage in pending}
            fired.unlink(missing_ok=True)
            code, output = ws.run(RELIABILITY_KILL=",".join(armed), RELIABILITY_KILLED=str(fired))
            if code == 0:
                break
            assert code == KILLED and armed, f"seed {seed}, {list(armed)}: {output[-3000:]}"
            stage = armed[fired.read_text()]
            kills[stage] += 1
            pending.remove(stage)
            after_a_kill(ws)
        like_the_reference(ws, reference)
    print(f"seed {seed}, {rounds} rounds, kills that landed: {dict(kills)}")
    assert set(STAGES) <= set(kills), kills  # every stage was killed at least once
