"""Ctrl-C and SIGTERM to `saeflow run`'s process group (as a terminal sends them), and SIGKILL.

A run without PREFECT_API_URL reports to a temporary Prefect server of its own, as a new user's
does. A signal during extraction or training stops the run within 5 s: one line, no traceback,
exit code 128 + the signal, the flow run Cancelled in Prefect's database, the stage left
resumable and no process of the run left behind. The re-run completes equal to a run nothing
disturbed. A SIGKILLed run leaves no temporary server running either.

Slow: each run is a `saeflow` subprocess that starts its own Prefect server (~1-2 min on two
busy cores). `.venv/bin/pytest -m slow tests/reliability/test_signals.py`.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from sae_core.storage.store import Store
from tests.reliability.conftest import WORKER, Reference, Workspace
from tests.reliability.test_kill import after_a_kill, completes_like_the_reference, sae_manifest

pytestmark = pytest.mark.slow
STOP_SECONDS = 5.0


class Moment(NamedTuple):
    """Where a stage is under way: its first store write into `pattern`, each of its writes
    slowed by `slow` seconds so that the signal lands before the stage ends."""

    pattern: str
    slow: float


MOMENTS = {"extraction": Moment("activations/", 0.5), "training": Moment("checkpoints/", 1.0)}


class Started(NamedTuple):
    proc: subprocess.Popen
    output: Path


def start_run(ws: Workspace, moment: Moment) -> Started:
    """`saeflow run` in a process group of its own (a terminal's foreground job), its output
    to a file (a pipe nobody reads would fill up and stall it)."""
    output = ws.root / "output.txt"
    env = ws.env(
        RELIABILITY_SIGNAL=f"{moment.pattern}:{ws.root / 'reached'}",
        RELIABILITY_SLOW=f"{moment.pattern}:{moment.slow}",
    )
    with open(output, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(WORKER), *ws.args()],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Started(proc, output)


def reach(ws: Workspace, run: Started, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not (ws.root / "reached").exists():
        assert run.proc.poll() is None, run.output.read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper serves nothing)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def flow_run_states(ws: Workspace) -> list[str]:
    """The state of every flow run in the workspace's Prefect database."""
    with sqlite3.connect(ws.home / "prefect" / "prefect.db") as db:
        return [state for (state,) in db.execute("SELECT state_type FROM flow_run")]


@pytest.mark.parametrize(
    ("stage", "signum"),
    [
        ("extraction", signal.SIGINT),
        ("training", signal.SIGINT),
        ("training", signal.SIGTERM),
    ],
    ids=["extraction-sigint", "training-sigint", "training-sigterm"],
)
def test_a_signal_to_the_process_group_stops_the_run_then_the_rerun_completes(
    stage: str, signum: int, new_workspace, reference: Reference
) -> None:
    ws = new_workspace(f"{stage}-{signum}")
    run = start_run(ws, MOMENTS[stage])
    reach(ws, run)
    left_behind = children(run.proc.pid)  # the temporary Prefect server among them
    sent = time.monotonic()
    os.killpg(run.proc.pid, signum)
    run.proc.wait(timeout=120)
    seconds = time.monotonic() - sent
    output = run.output.read_text()
    assert run.proc.returncode == 128 + signum, output[-3000:]
    assert seconds < STOP_SECONDS, output[-3000:]
    lines = [line for line in output.splitlines() if line.strip()]
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"stopped by {name}: "), output[-3000:]
    assert "Traceback" not in output and "Crash" not in output, output[-3000:]
    assert flow_run_states(ws) == ["CANCELLED"]
    assert not [pid for pid in left_behind if alive(pid)]
    after_a_kill(ws)
    store = Store(ws.store)
    stopped_in = {"extraction": "activations", "training": "sae"}[stage]
    assert not any(store.is_committed(f"{stopped_in}/{fp}") for fp in store.listdir(stopped_in))
    print(f"{stage}, {name}: stopped {seconds:.2f} s after the signal")

    completes_like_the_reference(ws, reference)
    assert flow_run_states(ws) == ["CANCELLED", "COMPLETED"]
    if stage == "training":
        assert sae_manifest(ws)["resumed_from_tokens"] > 0  # from the stopped run's checkpoint


def test_a_sigkilled_run_leaves_no_temporary_prefect_server(new_workspace) -> None:
    ws = new_workspace("sigkill")
    run = start_run(ws, MOMENTS["extraction"])
    reach(ws, run)
    server = children(run.proc.pid)
    assert server, "the run has no child process: where is its temporary Prefect server?"
    run.proc.kill()  # the run alone, as the OOM killer does
    run.proc.wait()
    deadline = time.monotonic() + STOP_SECONDS
    while any(alive(pid) for pid in server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in server if alive(pid)], "orphaned: " + " ".join(
        Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in server
    )
