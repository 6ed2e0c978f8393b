"""Removing saeflow's state: `make clean` (the whole state directory, services stopped first)
and `saeflow services down --purge` (the services' own folders)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parents[2]


def _stand_in_server(home: Path) -> subprocess.Popen:
    """A process `services down` takes for the SeaweedFS server `up` recorded (its command line
    names the service's data folder), in its own session as `up` starts servers."""
    folder = home / "services" / "seaweedfs"
    (folder / "data").mkdir(parents=True)
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", str(folder / "data")],
        start_new_session=True,
    )
    (folder / "server.json").write_text(
        json.dumps({"pid": process.pid, "endpoint": "http://127.0.0.1:9", "port_base": 0})
    )
    return process


def test_make_clean_stops_the_services_then_removes_saeflow_home(tmp_path: Path) -> None:
    """Before: `make clean` removed ./.saeflow whatever SAEFLOW_HOME said, servers running."""
    home = tmp_path / "home"
    server = _stand_in_server(home)
    (home / "store").mkdir()
    own = REPO / ".saeflow"
    had_own = own.exists()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        result = subprocess.run(
            ["make", "-s", "clean"],
            cwd=REPO,
            env=env | {"SAEFLOW_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "seaweedfs: stopped" in result.stdout
        assert server.wait(timeout=20) is not None  # stopped, not orphaned
        assert not home.exists()
        assert own.exists() == had_own  # the checkout's own state is not SAEFLOW_HOME's
    finally:
        if server.poll() is None:
            server.kill()


def test_make_clean_refuses_to_remove_the_home_directory() -> None:
    result = subprocess.run(
        ["make", "-s", "clean", f"SAEFLOW_HOME={Path.home()}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "refusing to remove" in result.stdout
    assert Path.home().exists()


def test_services_down_purge_removes_their_data_and_says_what(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("SAEFLOW_HOME", str(home))
    for name in ("seaweedfs", "mlflow", "prefect"):
        (home / "services" / name).mkdir(parents=True)
        (home / "services" / name / "data.bin").write_bytes(b"x" * 2**20)
    runner = CliRunner()
    kept = runner.invoke(app, ["services", "down"])
    assert kept.exit_code == 0 and "removed" not in kept.output
    assert all((home / "services" / n / "data.bin").exists() for n in ("seaweedfs", "prefect"))
    purged = runner.invoke(app, ["services", "down", "seaweedfs", "--purge"])
    assert purged.exit_code == 0, purged.output
    assert (
        f"seaweedfs: removed {home / 'services' / 'seaweedfs'} (1.0 MiB: its data, credentials "
        "and log)" in purged.output
    )
    assert not (home / "services" / "seaweedfs").exists()
    assert (home / "services" / "mlflow" / "data.bin").exists()  # only the named service


def test_services_down_purge_stops_a_running_service_first(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("SAEFLOW_HOME", str(home))
    server = _stand_in_server(home)
    try:
        result = CliRunner().invoke(app, ["services", "down", "seaweedfs", "--purge"])
        assert result.exit_code == 0, result.output
        deadline = time.monotonic() + 20
        while server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert server.poll() is not None
        assert not (home / "services" / "seaweedfs").exists()
    finally:
        if server.poll() is None:
            server.kill()
