"""Detached server processes: start one with its own log, tell whether a recorded pid is still it, stop it.

Servers run in their own session (process group), so they outlive the command that started them
and a stop reaches every process they spawned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple


class Account(NamedTuple):
    """An unprivileged user a server runs as when saeflow runs as root."""

    name: str
    uid: int
    gid: int

    def popen_options(self) -> dict[str, object]:
        """subprocess's user, group and (none) supplementary groups of this account."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def spawn(
    args: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    rotate_log: bool = False,
    account: Account | None = None,
) -> subprocess.Popen:
    """Start `args` in a new session, stdout and stderr appended to `log`; what it creates is
    owner-only (umask 077: its data, sockets and logs are nobody else's to read).

    rotate_log: the server runs under deployments/rotating_log.py, which caps the log's size
    (keeping a few old files); the recorded process is that copier, whose command line holds
    the server's.
    account: run as this user, without supplementary groups (a server that refuses root)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if rotate_log:
        args = [sys.executable, "-m", "deployments.rotating_log", str(log), "--", *args]
        log = Path(os.devnull)
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd=cwd,
            umask=0o077,
            **(account.popen_options() if account else {}),
        )


def is_running(pid: int, marker: str = "") -> bool:
    """Whether `pid` is alive and, where /proc tells, its command line contains `marker`
    (a recorded pid may have been reused by an unrelated process since)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's: not ours
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if marker and cmdline.exists():
        try:
            return marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
    return True


def _gone(pid: int, process: subprocess.Popen | None) -> bool:
    if process is not None:
        return process.poll() is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone for our purposes: it serves nothing (its parent reaps it).
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "\nState:\tZ" in status.read_text()


def terminate(
    pid: int,
    timeout: float = 15.0,
    process: subprocess.Popen | None = None,
    leader_signal: signal.Signals | None = None,
) -> None:
    """SIGTERM the process group led by `pid`; SIGKILL it if it is still there after `timeout`.

    leader_signal: send this to `pid` alone instead (a server that stops its own workers, as
    PostgreSQL does on SIGINT, its fast shutdown)."""
    try:
        if leader_signal is None:
            os.killpg(pid, signal.SIGTERM)
        else:
            os.kill(pid, leader_signal)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid, process):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if process is not None:
        process.wait()
