"""A training process SIGKILLed mid-run resumes from its checkpoint to bit-identical weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import HELPERS

WORKER = HELPERS / "resume_worker.py"
ENV = {**os.environ, "SAEFLOW_NATIVE_KERNELS": os.environ.get("SAEFLOW_NATIVE_KERNELS", "1")}


def _run(store: Path, out: Path, sleep_s: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(store), str(out), str(sleep_s)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow
def test_sigkill_then_restart_gives_bit_identical_weights(tmp_path):
    reference = tmp_path / "reference.safetensors"
    proc = _run(tmp_path / "store_ref", reference, 0.0)
    assert proc.wait(timeout=300) == 0, proc.stdout.read().decode()

    store, out = tmp_path / "store", tmp_path / "resumed.safetensors"
    ckpt = store / "ckpt" / "last.safetensors"
    victim = _run(store, out, 0.02)
    deadline = time.monotonic() + 120
    while not ckpt.exists():  # the first checkpoint lands after 10 steps
        assert victim.poll() is None and time.monotonic() < deadline, (
            "worker ended before a checkpoint"
        )
        time.sleep(0.05)
    time.sleep(0.5)  # ~25 more steps: killed between checkpoints, maybe mid-write
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert not out.exists(), "the worker finished before it was killed"

    restart = _run(store, out, 0.0)
    assert restart.wait(timeout=300) == 0, restart.stdout.read().decode()
    a, b = load_file(reference), load_file(out)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resume"
