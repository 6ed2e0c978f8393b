"""`saeflow services up --db postgres`: where the binaries come from, who runs them, how the
servers are pointed at PostgreSQL without its password on a command line; end to end (slow), the
pipeline, two concurrent runs and a promotion against Prefect and MLflow on a real PostgreSQL."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deployments.deploy import REPO
from deployments.postgres import BIN_ENV, USER_ENV, Postgres, binaries, server_account
from deployments.servers import MlflowServer, PrefectServer, choose_database, chosen_database
from tests.helpers.cli import assert_one_line_error, invoke
from tests.helpers.services import free_port, listening
from tests.reliability.conftest import MODEL_NAME, Workspace, tiny_preset_data


def test_the_binaries_come_from_the_named_folder_else_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(BIN_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{BIN_ENV}={tmp_path}.*apt-get install"):
        binaries()
    for tool in ("initdb", "postgres"):
        (tmp_path / tool).write_text("")
    assert binaries() == tmp_path


def test_root_runs_the_server_as_an_unprivileged_account(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv(USER_ENV, "nobody")
    account = server_account()
    assert account is not None and account.name == "nobody" and account.uid != 0
    for refused in ("root", "no-such-account-here"):
        monkeypatch.setenv(USER_ENV, refused)
        with pytest.raises(RuntimeError, match=f"set {USER_ENV}"):
            server_account()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert server_account() is None  # anyone else runs it as themselves


def test_the_servers_use_postgres_once_chosen_with_the_password_off_their_command_lines(
    tmp_path,
):
    home = tmp_path / "services"
    assert chosen_database(home) == "sqlite"
    assert "sqlite:///" in " ".join(MlflowServer(home).command())
    assert "PREFECT_SERVER_DATABASE_CONNECTION_URL" not in PrefectServer(home).server_env()

    choose_database("postgres", home)
    postgres = Postgres(home)
    (postgres.dir / "port").parent.mkdir(parents=True)
    (postgres.dir / "port").write_text("54321")  # as `up` keeps it
    password = postgres.password()
    assert (postgres.dir / "password").stat().st_mode & 0o077 == 0

    mlflow, prefect = MlflowServer(home), PrefectServer(home)
    assert mlflow.database == prefect.database == "postgres"
    command = " ".join(mlflow.command() + prefect.command())
    assert password not in command and "sqlite" not in command
    assert (
        mlflow.server_env()["MLFLOW_BACKEND_STORE_URI"]
        == f"postgresql://saeflow:{password}@127.0.0.1:54321/mlflow"
    )
    assert (
        prefect.server_env()["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
        == f"postgresql+asyncpg://saeflow:{password}@127.0.0.1:54321/prefect"
    )
    assert postgres.env(reveal=True) == {}  # only the servers connect to it


def test_a_server_on_postgres_refuses_to_start_without_it(tmp_path):
    prefect = PrefectServer(tmp_path / "services", port=free_port(), database="postgres")
    with pytest.raises(RuntimeError, match=r"start it first \(saeflow services up --db postgres"):
        prefect.up(timeout=1)
    assert prefect.record() is None  # nothing was started


def test_services_cli_names_a_bad_db_and_reports_postgres(tmp_path):
    env = {"SAEFLOW_HOME": str(tmp_path)}
    assert_one_line_error(invoke("services", "up", "--db", "mysql", env=env), "--db mysql")
    # PostgreSQL missing: one line naming the fix, and SQLite stays the choice.
    missing = invoke("services", "up", "postgres", "--db", "postgres", env=env | {BIN_ENV: "/"})
    assert_one_line_error(missing, f"set {BIN_ENV}")
    assert chosen_database(tmp_path / "services") == "sqlite"
    status = invoke("services", "status", env=env)
    assert status.exit_code == 0, status.output
    assert "postgres: stopped" in status.output and "databases prefect, mlflow" in status.output
    down = invoke("services", "down", "postgres", "--purge", env=env)
    assert down.exit_code == 0 and "postgres: stopped" in down.output, down.output


def _rows(postgres: Postgres, database: str, query: str) -> list[tuple]:
    connection = postgres._connect(database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchall()
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.s3
def test_pipeline_concurrent_runs_and_a_promotion_on_postgres(
    tmp_path, tiny_llama_dir, tiny_corpus_dir
):
    """Prefect's and MLflow's data in one PostgreSQL: two pipeline runs at once (sharing their
    data stages, each registering a version), then a promotion; every flow run and every version
    is in PostgreSQL, no SQLite was used, and the cluster listens on loopback only. Slow: four
    servers and three CLI processes on 2 cores."""
    from deployments.seaweedfs import SeaweedFS

    try:
        binaries()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    home = tmp_path / "services"
    s3 = SeaweedFS(home, s3_port=free_port(), port_base=random.randrange(20000, 40000, 100))
    postgres = Postgres(home)
    services = [
        s3,
        postgres,
        MlflowServer(home, port=free_port(), s3=s3, database="postgres"),
        PrefectServer(home, port=free_port(), database="postgres"),
    ]
    try:
        try:
            s3.up()
        except FileNotFoundError as err:
            pytest.skip(str(err))
        for service in services[1:]:
            assert service.up(timeout=300).serving, service.name
        assert {p.rsplit(":", 1)[0] for p in listening(postgres.status().pid)} == {"127.0.0.1"}

        env: dict[str, str] = {}
        for service in services:
            env |= service.env(reveal=True)
        preset = tmp_path / "postgres.yaml"
        preset.write_text(yaml.safe_dump(tiny_preset_data(tiny_llama_dir, tiny_corpus_dir)))
        # Two runs at once of two SAEs on one data configuration (one computes the data stages
        # while the other waits for it), each registering a version, on a local store: the
        # servers' databases are what is under test. PYTHONPATH: the runs import this checkout.
        (tmp_path / "ws").mkdir()
        store = str(tmp_path / "store")
        ws = Workspace(tmp_path / "ws", preset, store, env_extra=env, code=REPO)
        runs = [ws.spawn(), ws.spawn("sae.k=16")]
        try:
            outputs = [run.communicate(timeout=1800)[0] for run in runs]
        finally:
            for run in runs:
                if run.poll() is None:
                    run.kill()
                    run.wait()
        assert [run.returncode for run in runs] == [0, 0], [out[-3000:] for out in outputs]
        promoted = subprocess.run(
            [Path(sys.executable).with_name("saeflow"), "promote", MODEL_NAME],
            env=ws.env(),
            capture_output=True,
            text=True,
            timeout=1800,  # its imports alone took over 5 min at load 24 on 2 cores
        )
        assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]

        versions = _rows(
            postgres, "mlflow", f"SELECT version FROM model_versions WHERE name = '{MODEL_NAME}'"
        )
        assert sorted(v for (v,) in versions) == [1, 2]
        aliases = dict(
            _rows(postgres, "mlflow", "SELECT alias, version FROM registered_model_aliases")
        )
        assert aliases["champion"] == aliases["challenger"], aliases  # the first champion
        flow_runs = _rows(
            postgres,
            "prefect",
            "SELECT flow.name, flow_run.state_type FROM flow_run JOIN flow "
            "ON flow.id = flow_run.flow_id",
        )
        pipelines = [state for name, state in flow_runs if name == "saeflow-pipeline"]
        assert pipelines == ["COMPLETED"] * 2, flow_runs
        assert ("saeflow-promote", "COMPLETED") in flow_runs, flow_runs
        # No SQLite but MLflow's accounts (basic auth), neither the servers' nor embedded.
        assert {p.name for p in tmp_path.rglob("*.db")} == {"basic_auth.db"}
    finally:
        for service in reversed(services):
            service.down()
        postgres.purge()
    assert not postgres.cluster.exists() and not postgres.dir.exists()
