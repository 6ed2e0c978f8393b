"""Security: no pickle is ever loaded (a malicious one where weights or a checkpoint belong is
refused and its payload never runs), store paths cannot leave the store root, and the local
services listen on loopback only, behind credentials."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from sae_core.errors import ConfigError, StoreError
from sae_core.sae import WEIGHTS_FILE, load_sae
from sae_core.stages import train as train_stage
from sae_core.storage.manifests import SaeManifest
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from tests.helpers.manifests import example_sae
from tests.reliability.conftest import committed, error_line

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ["sae_core", "tasks", "flows", "deployments"]


class Payload:
    """Unpickling it creates `marker`: the proof that a loader ran pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def malicious(marker: Path, kind: str) -> bytes:
    """A plain pickle, or the zip that torch.save writes around one."""
    if kind == "pickle":
        return pickle.dumps(Payload(marker))
    path = marker.with_suffix(".pt")
    torch.save({"weights": Payload(marker)}, path)
    return path.read_bytes()


KINDS = ["pickle", "torch-save"]


@pytest.mark.parametrize("kind", KINDS)
def test_the_payload_runs_when_unpickled(tmp_path: Path, kind: str) -> None:
    """The harness itself: loading the file with pickle does create the marker."""
    marker = tmp_path / "pwned"
    data = malicious(marker, kind)
    marker.unlink(missing_ok=True)
    if kind == "pickle":
        pickle.loads(data)
    else:
        torch.load(marker.with_suffix(".pt"), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_pickle_as_the_training_checkpoint_is_refused(tmp_path, kind, copied_store, tiny_config):
    folder, _, acts = copied_store
    marker = tmp_path / "pwned"
    data = malicious(marker, kind)
    marker.unlink(missing_ok=True)
    fp = train_stage.locate_sae(acts, tiny_config.sae, tiny_config.train).fingerprint
    Store(str(folder)).write_bytes(f"checkpoints/{fp}/last.safetensors", data)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        train_stage.train_sae(acts, tiny_config.sae, tiny_config.train, progress=False)
    assert not marker.exists()
    assert not [path for path in committed(Store(str(folder))) if path.startswith("sae/")]


def pickled_sae_dataset(folder: Path, acts: DatasetRef, data: bytes) -> DatasetRef:
    """A committed sae dataset (lineage and all) whose weights file is `data`."""
    store = Store(str(folder))
    with store.writing("sae/evil") as writer:
        writer.write_bytes(WEIGHTS_FILE, data)
        writer.manifest = example_sae(fingerprint="evil", activations=acts.uri)
    return DatasetRef(store=store.uri, path="sae/evil", fingerprint="evil")


@pytest.mark.parametrize("kind", KINDS)
def test_a_pickle_as_the_sae_weights_is_refused(tmp_path, kind, copied_store, new_workspace):
    folder, _, acts = copied_store
    marker = tmp_path / "pwned"
    data = malicious(marker, kind)
    marker.unlink(missing_ok=True)
    ref = pickled_sae_dataset(folder, acts, data)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        load_sae(ref)
    ws = new_workspace("ws")
    out = tmp_path / "exported"
    result = ws.invoke("export", ref.uri, "--format", "saelens", "--out", str(out))
    assert result.exit_code == 2 and "not a safetensors file" in error_line(result.output)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_pickle_in_an_imported_sae_folder_is_refused(tmp_path, kind, new_workspace):
    marker = tmp_path / "pwned"
    folder = tmp_path / "saelens"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "k": 4}))
    (folder / "sae_weights.safetensors").write_bytes(malicious(marker, kind))
    marker.unlink(missing_ok=True)
    result = new_workspace("ws").invoke("import", str(folder), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "not a readable safetensors file" in error_line(result.output)
    assert not marker.exists()


@pytest.fixture
def pickled_model(tmp_path: Path, tiny_llama_dir: Path) -> tuple[Path, Path]:
    """The tiny model with its weights as a malicious pytorch_model.bin: (folder, marker)."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(malicious(marker, "torch-save"))
    marker.unlink(missing_ok=True)
    return folder, marker


def test_pickle_model_weights_are_never_loaded(pickled_model) -> None:
    from sae_core.data.models import load_model

    folder, marker = pickled_model
    with pytest.raises(ConfigError, match="model.path"):
        load_model(str(folder), device="cpu")
    assert not marker.exists()


def test_a_run_on_pickle_model_weights_is_refused_before_any_work(pickled_model, new_workspace):
    folder, marker = pickled_model
    ws = new_workspace("ws")
    result = ws.invoke(*ws.args(f"model.path={folder}"))
    assert result.exit_code == 2
    assert "never loaded, they can run code" in error_line(result.output)
    assert not marker.exists() and not Path(ws.store).exists()


def test_no_product_code_deserialises_pickle() -> None:
    """A static guard for the load paths to come: no pickle, torch.load or unsafe YAML."""
    pattern = re.compile(
        r"\b(pickle\.loads?|cloudpickle|dill\.loads?|joblib\.load|torch\.load|yaml\.load\(|"
        r"yaml\.unsafe_load|weights_only\s*=\s*False)"
    )
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for package in PRODUCT
        for path in sorted((REPO / package).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_persisted_task_results_are_json_not_pickle() -> None:
    """Prefect reads persisted results back on a cache hit: they must not be pickles."""
    import importlib
    import pkgutil

    from prefect import Task

    import tasks

    found = []
    for module in pkgutil.iter_modules(tasks.__path__):
        for value in vars(importlib.import_module(f"tasks.{module.name}")).values():
            if isinstance(value, Task) and value.persist_result:
                serializer = value.result_serializer
                found.append((value.name, getattr(serializer, "type", serializer)))
    assert found and all(serializer == "json" for _, serializer in found), found


# Store paths --------------------------------------------------------------------------------
ESCAPES = [
    "..", "../x", "a/../../x", "a/..", "./x", ".hidden", "a/.", "..\\x", "a\\..\\..\\x",
    "%2e%2e/x", "a\x00b", "~/x", " ../x", "a//..//..//b", "...",
]  # fmt: skip


@pytest.mark.parametrize("uri", ["local", "s3://bucket/prefix"])
@pytest.mark.parametrize("rel", ESCAPES)
def test_store_paths_from_user_input_stay_under_the_root(rel, uri, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # no request leaves anyway
    store = Store(str(tmp_path / "root") if uri == "local" else uri)
    for build in (store.path, store.url):
        try:
            built = build(rel)
        except StoreError:
            continue
        assert built.startswith((store.root, store.uri)) and ".." not in built.split("/"), built


def test_a_dataset_reference_cannot_reach_outside_its_store(tmp_path: Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "_MANIFEST.json").write_text("{}")
    ref = DatasetRef(store=str(tmp_path / "store"), path="../secret", fingerprint="x")
    with pytest.raises(StoreError, match="'..' is not allowed"):
        ref.manifest(SaeManifest)
    with pytest.raises(StoreError), Store(str(tmp_path / "store")).writing("../secret"):
        pass
    assert (tmp_path / "secret" / "_MANIFEST.json").exists()  # `writing` clears first: it did not


def test_an_export_source_cannot_reach_outside_its_store(tmp_path, new_workspace) -> None:
    ws = new_workspace("ws")
    result = ws.invoke("export", f"{tmp_path}/store/sae/..", "--format", "saelens", "--out", "o")
    assert result.exit_code == 2 and "'..' is not allowed" in error_line(result.output)


# Services -----------------------------------------------------------------------------------
def test_seaweedfs_binds_loopback_and_requires_credentials(tmp_path, monkeypatch) -> None:
    """The arguments and files `saeflow services up` starts SeaweedFS with (the real start and
    the refused requests: test_services.py, slow)."""
    from deployments import seaweedfs
    from deployments.seaweedfs import SeaweedFS

    started: list[tuple[list[str], Path]] = []

    class Started:
        pid = 1

    def spawn(args: list[str], log: Path, env=None, cwd: Path | None = None) -> Started:
        started.append((args, cwd))
        return Started()

    monkeypatch.setattr(seaweedfs, "weed_binary", lambda: "weed")
    monkeypatch.setattr(seaweedfs, "spawn", spawn)
    monkeypatch.setattr(seaweedfs, "wait_ready", lambda *args: None)
    monkeypatch.setattr(SeaweedFS, "status", lambda self: None)
    SeaweedFS(tmp_path / "services").up()
    [(args, cwd)] = started
    assert "-ip=127.0.0.1" in args and "-ip.bind=127.0.0.1" in args
    assert "-s3.autoCreateBucket=false" in args
    config = next(a.removeprefix("-s3.config=") for a in args if a.startswith("-s3.config="))
    client, admin = json.loads(Path(config).read_text())["identities"]
    assert client["credentials"][0]["secretKey"]  # S3 requests must be signed with it
    assert "Admin" not in client["actions"]  # so it cannot create buckets
    assert admin["actions"] == ["Admin"] and admin["credentials"][0]["secretKey"]
    assert Path(config).stat().st_mode & 0o077 == 0
    # `weed` reads ./security.toml: JWT keys and client certificates for every internal port.
    security = tomllib.loads((cwd / "security.toml").read_text())
    for section in (security["jwt"]["signing"], security["jwt"]["filer_signing"]):
        assert len(section["key"]) >= 32 and len(section["read"]["key"]) >= 32
    for server in ("master", "volume", "filer", "admin"):
        assert security["https"][server]["ca"] and security["https"][server]["cert"]
    for server in ("master", "volume", "filer", "s3", "admin"):
        assert security["grpc"][server]["cert"]
    private = [cwd / "security.toml", *(cwd / "tls").iterdir()]
    assert all(p.stat().st_mode & 0o077 == 0 for p in private), private
    assert not [p for p in private if "ca.key" in p.name]  # no one can sign another cert


@pytest.mark.parametrize("name", ["mlflow", "prefect"])
def test_http_services_bind_loopback(name: str, tmp_path: Path) -> None:
    from deployments.services import SERVICES

    command = SERVICES[name](tmp_path).command()
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_http_services_require_credentials(tmp_path: Path) -> None:
    """What MLflow and Prefect are started with (the real start: test_services.py, slow)."""
    from deployments.servers import MlflowServer, PrefectServer

    mlflow = MlflowServer(tmp_path)
    assert "basic-auth" in mlflow.command()
    password = mlflow.server_env()["MLFLOW_AUTH_ADMIN_PASSWORD"]
    assert len(password) >= 32 and mlflow.env(reveal=True)["MLFLOW_TRACKING_PASSWORD"] == password
    prefect = PrefectServer(tmp_path)
    auth = prefect.server_env()["PREFECT_SERVER_API_AUTH_STRING"]
    assert prefect.env(reveal=True)["PREFECT_API_AUTH_STRING"] == auth
    assert password not in auth  # one password per server
    for secret in (tmp_path / "mlflow" / "password", tmp_path / "prefect" / "password"):
        assert secret.stat().st_mode & 0o077 == 0
