"""What the reliability tests share: a tiny preset, workspaces to run `saeflow` in (in-process
for bad input, as a killable subprocess for faults), and the checks every fault scenario ends
with: every committed dataset is whole (nothing unfinished passes for finished), the registry
holds one version per completed run, and the outputs equal those of an undisturbed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from typer.testing import CliRunner, Result

from sae_core.storage.store import PROGRESS, Store
from tests.helpers import HELPERS

WORKER = HELPERS / "pipeline_worker.py"
MODEL_NAME = "reliability-sae"
CHECKPOINT_TOKENS = 1024  # train.checkpoint_every_tokens of the tiny preset: 4 checkpoints a run
# Folders whose files are the pipeline's results; validation docs and reports carry timestamps.
RESULT_STAGES = ("tokens", "activations", "sae", "baseline", "probes", "eval")
# Environment a test sets for one worker only, or an earlier test left in this process (MLflow
# exports the tracking URI it is given): never inherited by a workspace's runs.
_ARMED = (
    "RELIABILITY_",
    "SAEFLOW_INJECT_FAULT",
    "SAEFLOW_HOME",
    "SAEFLOW_STORE",
    "PREFECT_",
    "MLFLOW_TRACKING_URI",
)


def tiny_preset_data(model_dir: Path, corpus_dir: Path) -> dict[str, Any]:
    """A run of a few seconds per stage, with several shards and checkpoints to be killed between."""
    return {
        "name": "reliability",
        "model": {"path": str(model_dir), "hook": "resid_post.2"},
        "data": {
            "corpus": str(corpus_dir),
            "context_len": 32,
            "train_tokens": 4096,
            "eval_tokens": 512,
            "shard_rows": 500,
        },
        "sae": {"n_latents": 256, "k": 8, "dead_window_tokens": 2048},
        "train": {"batch_size": 256, "checkpoint_every_tokens": CHECKPOINT_TOKENS},
        "eval": {"ablation_samples": 16, "probe_contexts": 32, "probe_tokens": 512},
        "registry": {"model_name": MODEL_NAME},
    }


@pytest.fixture(scope="session")
def tiny_preset(tmp_path_factory, tiny_llama_dir: Path, tiny_corpus_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("preset") / "reliability.yaml"
    path.write_text(yaml.safe_dump(tiny_preset_data(tiny_llama_dir, tiny_corpus_dir)))
    return path


@pytest.fixture(scope="session")
def frozen_code(tmp_path_factory) -> Path:
    """The product's packages as they were when the session started, for the subprocess runs.

    Outputs are named by a fingerprint of the code that makes them: an edit to the checkout
    during a long session (another change in progress) would otherwise give a killed run and
    its re-run, or a run and its reference, different outputs to compare."""
    import shutil

    repo = Path(__file__).resolve().parents[2]
    frozen = tmp_path_factory.mktemp("code")
    for package in ("sae_core", "tasks", "flows", "deployments"):
        shutil.copytree(
            repo / package, frozen / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    return frozen


@dataclass(frozen=True)
class Workspace:
    """A state directory (MLflow, Prefect home, locks), a store and the preset to run."""

    root: Path
    preset: Path
    store: str
    prefect_api: str | None = None  # a running Prefect server; None: each run starts its own
    env_extra: dict[str, str] = field(default_factory=dict)
    code: Path | None = None  # subprocesses import the product from here (frozen_code)

    @property
    def home(self) -> Path:
        return self.root / "home"

    def args(self, *overrides: str) -> list[str]:
        sets = [arg for override in overrides for arg in ("--set", override)]
        return ["run", "--preset", str(self.preset), "--store", self.store, "--no-progress", *sets]

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ARMED)}
        env |= {"SAEFLOW_HOME": str(self.home), "PREFECT_HOME": str(self.home / "prefect")}
        if self.prefect_api:
            env["PREFECT_API_URL"] = self.prefect_api
        if self.code:
            env["PYTHONPATH"] = str(self.code)
        return env | self.env_extra | extra

    def invoke(self, *args: str, env: dict[str, str] | None = None) -> Result:
        """`saeflow ARGS` in this process (CliRunner), with this workspace's state directory."""
        from flows.cli import app

        # No tracking URI an earlier test left in this process: the run records in its home.
        # No tracking URI an earlier test left in this process: the run records in its home.
        env = {"SAEFLOW_HOME": str(self.home), "MLFLOW_TRACKING_URI": None, **(env or {})}
        return CliRunner().invoke(app, list(args), env=env)

    def spawn(self, *overrides: str, **env: str) -> subprocess.Popen:
        """`saeflow run` of the preset in a subprocess (tests/helpers/pipeline_worker.py:
        RELIABILITY_* variables arm its faults); stdout and stderr together."""
        return subprocess.Popen(
            [sys.executable, str(WORKER), *self.args(*overrides)],
            env=self.env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def run(self, *overrides: str, timeout: float = 600, **env: str) -> tuple[int, str]:
        """Run to the end (or to the kill): (exit code, output). -9: SIGKILLed."""
        proc = self.spawn(*overrides, **env)
        try:
            output, _ = proc.communicate(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return proc.returncode, output

    def _registry(self) -> Any:
        import mlflow

        return mlflow.MlflowClient(f"sqlite:///{self.home / 'mlflow.db'}")

    def versions(self) -> list[Any]:
        """The registered versions of the preset's model (MLflow ModelVersion objects)."""
        if not (self.home / "mlflow.db").exists():
            return []
        return self._registry().search_model_versions(f"name = '{MODEL_NAME}'")

    def challenger(self) -> str:
        """The version the `challenger` alias points at."""
        return str(self._registry().get_model_version_by_alias(MODEL_NAME, "challenger").version)


@pytest.fixture
def new_workspace(tmp_path: Path, tiny_preset: Path, frozen_code: Path) -> Callable[..., Workspace]:
    """new_workspace(name, store=None, prefect_api=None, env=None): a fresh workspace under
    tmp_path; `env` goes to every run (e.g. an S3 server's AWS_* variables)."""

    def make(
        name: str,
        store: str | None = None,
        prefect_api: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Workspace:
        root = tmp_path / name
        root.mkdir()
        store = store or str(root / "store")
        return Workspace(root, tiny_preset, store, prefect_api, env or {}, frozen_code)

    return make


@pytest.fixture
def prefect_api(prefect) -> str:
    """The session's Prefect server, for subprocesses (starting one per run costs ~10 s)."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


class Reference(NamedTuple):
    workspace: Workspace
    seconds: float  # how long the undisturbed run took, start to exit


@pytest.fixture(scope="session")
def reference(tmp_path_factory, tiny_preset: Path, frozen_code: Path, prefect) -> Reference:
    """A run of the tiny preset that nothing disturbed: what every faulted run must end equal to."""
    from prefect.settings import PREFECT_API_URL

    root = tmp_path_factory.mktemp("reference")
    api = PREFECT_API_URL.value()
    ws = Workspace(root, tiny_preset, str(root / "store"), api, code=frozen_code)
    started = time.monotonic()
    code, output = ws.run()
    assert code == 0, output[-3000:]
    return Reference(ws, time.monotonic() - started)


# Checks -----------------------------------------------------------------------------------------
def committed(store: Store) -> dict[str, dict[str, Any]]:
    """Every dataset with a manifest: {stage/fingerprint: manifest}."""
    found = {}
    for stage in store.listdir(""):
        for name in store.listdir(stage) if stage != "checkpoints" else []:
            if (manifest := store.manifest(f"{stage}/{name}")) is not None:
                found[f"{stage}/{name}"] = manifest
    return found


def _files(store: Store, folder: str) -> list[str]:
    """Every file below a dataset folder, relative to it."""
    root = store.path(folder)
    return sorted(p.removeprefix(f"{root}/") for p in store.fs.find(root))


def _whole(store: Store, path: str, manifest: dict[str, Any], settled: bool) -> None:
    """Raise unless the committed dataset holds what its manifest promises, readable."""
    import pyarrow.parquet as pq

    from sae_core.sae import load_sae_bytes
    from sae_core.storage.loader import open_shard

    files = _files(store, path)
    leftovers = [f for f in files if ".tmp-" in f or (settled and f.startswith(PROGRESS))]
    assert not leftovers, f"leftovers of an unfinished attempt: {leftovers}"
    kind = manifest.get("kind")
    for name in (f for f in files if f.endswith(".json")):
        json.loads(store.read_bytes(f"{path}/{name}"))
    if kind == "tokens":
        for split, info in manifest["splits"].items():
            with store.open(f"{path}/{split}.parquet") as fh:
                assert pq.read_metadata(fh).num_rows == info["contexts"], split
    elif kind == "activations":
        for split, info in manifest["splits"].items():
            listed = [s["name"] for s in info["shards"]]
            assert sorted(listed) == [f for f in files if f.startswith(f"{split}/")], split
            for shard in info["shards"]:
                with open_shard(store, f"{path}/{shard['name']}", verify=True) as parquet:
                    assert parquet.read().num_rows == shard["rows"], shard["name"]
            assert sum(s["rows"] for s in info["shards"]) == info["rows"], split
    elif kind == "sae":
        load_sae_bytes(store.read_bytes(f"{path}/sae.safetensors"))


def store_problems(uri: str, settled: bool = True) -> list[str]:
    """What is wrong with the committed datasets of a store; [] when each is whole. Datasets
    without a manifest (an interrupted attempt) are allowed: nothing takes them for finished.

    settled=False: the store as a kill may leave it, where an extraction killed between its
    commit and the removal of its completion marks (`_progress/`) still holds them: inert (no
    reader looks at them), they go at the next run."""
    store = Store(uri)
    problems = []
    for path, manifest in committed(store).items():
        try:
            _whole(store, path, manifest, settled)
        except Exception as err:  # noqa: BLE001 - every finding is reported, not just the first
            problems.append(f"{path}: {type(err).__name__}: {err}")
    return problems


def result_digests(uri: str) -> dict[str, str]:
    """{path: SHA-256} of the committed results (manifests aside: they name the store): a
    resumed run must write the same bytes as an undisturbed one, safetensors files included."""
    store = Store(uri)
    digests = {}
    for path in committed(store):
        if path.split("/")[0] in RESULT_STAGES:
            for name in _files(store, path):
                if name != "_MANIFEST.json":
                    data = store.read_bytes(f"{path}/{name}")
                    digests[f"{path}/{name}"] = hashlib.sha256(data).hexdigest()
    return digests


def error_line(output: str) -> str:
    """The one `error:` line a failed run ends with (asserting there is exactly one)."""
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


# Data made once per session (tests copy it before damaging it) -------------------------------
@pytest.fixture(scope="session")
def tiny_config(tiny_preset: Path) -> Any:
    from sae_core.config import load_config

    return load_config(str(tiny_preset))


@pytest.fixture(scope="session")
def made_store(tmp_path_factory, tiny_config) -> tuple[Path, Any, Any]:
    """A local store holding the tiny preset's tokens and activations: (folder, tokens ref,
    activations ref). Read-only: copy it (`copied_store`) to change it."""
    from sae_core.stages import extract as extract_stage
    from sae_core.stages import sample as sample_stage

    folder = tmp_path_factory.mktemp("made") / "store"
    cfg = tiny_config
    tokens = sample_stage.sample_tokens(str(folder), cfg.model, cfg.data, progress=False)
    acts = extract_stage.extract_activations(tokens, cfg.model, cfg.data, progress=False)
    return folder, tokens, acts


@pytest.fixture
def copied_store(made_store, tmp_path: Path) -> tuple[Path, Any, Any]:
    """made_store's datasets in a store of this test's own: (folder, tokens ref, acts ref)."""
    import shutil

    source, tokens, acts = made_store
    folder = tmp_path / "store"
    shutil.copytree(source, folder)
    moved = {"store": str(folder)}
    return folder, tokens.model_copy(update=moved), acts.model_copy(update=moved)
