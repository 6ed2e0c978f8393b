"""A server's log is size-capped (deployments/rotating_log.py): MLflow's server logs for as long
as it runs, and its log once only grew."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from deployments.process import spawn, terminate


def test_the_log_rotates_past_its_size_keeping_a_few_old_files(tmp_path: Path) -> None:
    lines = [f"request {i:05d} ".encode() + b"x" * 90 + b"\n" for i in range(1000)]  # 100 kB
    log = tmp_path / "server.log"
    subprocess.run(
        [sys.executable, "-m", "deployments.rotating_log", str(log), "--max-bytes", "10000",
         "--backups", "2"],
        input=b"".join(lines),
        check=True,
    )  # fmt: skip
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"]
    assert all((tmp_path / name).stat().st_size <= 10000 for name in files)
    kept = b"".join((tmp_path / n).read_bytes() for n in reversed(files))
    assert kept == b"".join(lines)[-len(kept) :]  # the newest lines, in order, whole
    assert kept.endswith(lines[-1])


def test_a_server_spawned_with_a_rotating_log_stops_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    program = "import time\nprint('serving', flush=True)\ntime.sleep(120)"
    server = spawn([sys.executable, "-c", program], log, rotate_log=True)
    deadline = time.monotonic() + 30
    while b"serving" not in (log.read_bytes() if log.exists() else b""):
        assert time.monotonic() < deadline, "the log never got the server's output"
        time.sleep(0.1)
    assert log.stat().st_mode & 0o077 == 0
    group = [p for p in Path("/proc").glob("[0-9]*") if _group(p) == server.pid]
    assert len(group) == 2  # the server and its log's writer
    terminate(server.pid, process=server)
    time.sleep(0.5)
    assert [p for p in group if p.exists() and _state(p) != "Z"] == []


def _group(proc: Path) -> int | None:
    try:
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _state(proc: Path) -> str:
    try:
        return (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
