"""The registered pyfunc model: it ships only the code inference imports, logs without
MLflow's warnings, and a fresh process loads it from the registry in seconds and predicts on
a stored activation shard (read with the helper shipped beside it)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.sae import build_sae
from sae_core.sae.formats import ORIGIN_FILE, Origin
from sae_core.storage.layout import STORAGE_SCHEMA, storage_batch
from sae_core.storage.manifests import SaeManifest
from tasks.model_code import inference_modules

D, N, K, ROWS = 64, 256, 8, 40
# What a registered model must not carry: the rooms inference never imports.
NOT_INFERENCE = ("bench", "data", "evaluation", "latents", "stages", "studies", "training")


def test_the_shipped_modules_are_those_inference_imports():
    modules = set(inference_modules())
    kinds = {"sae_core.sae.topk", "sae_core.sae.expander", "sae_core.sae.matryoshka"}
    assert kinds | {"sae_core.sae.normalize"} <= modules
    assert "sae_core.storage.layout" in modules  # read_activations, for stored shards
    assert not [m for m in modules if m.split(".")[1:2] and m.split(".")[1] in NOT_INFERENCE]
    # sae_core.sae names storage.refs under TYPE_CHECKING only: never imported at run time.
    assert "sae_core.storage.refs" not in modules
    # The Triton kernels (CUDA inference), which import each other relatively.
    assert {"sae_core.sae.triton.ops", "sae_core.sae.triton.gather"} <= modules
    assert {"sae_core.sae.triton.compact", "sae_core.sae.triton.checks"} <= modules


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A random SAE logged and registered as saeflow registers one, in a SQLite registry; the
    MLflow warnings logging raised; a stored shard of activations."""
    import mlflow

    from tasks.registry import _log_pyfunc

    tmp = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    sae = build_sae(D, SAEConfig(n_latents=N, k=K), generator=torch.Generator().manual_seed(0))
    folder = tmp / "model"
    folder.mkdir()
    sae.save_safetensors(folder / "sae.safetensors")
    (folder / ORIGIN_FILE).write_text(Origin(model="tiny", hook="resid_post.2").model_dump_json())
    manifest = SaeManifest.model_construct(d=D, n=N)
    acts = np.random.default_rng(0).standard_normal((ROWS, D)).astype(np.float32)
    columns = {"activation": acts, "sequence": np.arange(ROWS), "position": np.ones(ROWS),
               "token_id": np.zeros(ROWS)}  # fmt: skip
    shard = tmp / "shard-00000.parquet"
    pq.write_table(pa.Table.from_batches([storage_batch(columns, STORAGE_SCHEMA(D))]), str(shard))
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    kernels_switch = os.environ.get("SAEFLOW_NATIVE_KERNELS")
    mlflow.set_tracking_uri(uri)
    try:
        experiment = mlflow.create_experiment("pyfunc", (tmp / "artifacts").as_uri())
        with (
            warnings.catch_warnings(record=True) as caught,
            mlflow.start_run(experiment_id=experiment),
        ):
            warnings.simplefilter("always")
            info = _log_pyfunc(folder, manifest)
        version = mlflow.register_model(info.model_uri, "pyfunc-test").version
    finally:
        mlflow.set_tracking_uri(previous or "")
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
    # MLflow validates the input example by loading the model here: this process (saeflow's
    # own sae_core) keeps its native kernels.
    assert os.environ.get("SAEFLOW_NATIVE_KERNELS") == kernels_switch
    return uri, f"models:/pyfunc-test/{version}", sae, acts, shard, caught


def test_logging_the_model_raises_no_mlflow_warning(registered):
    *_, caught = registered
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "type hint" in m or "pip" in m], messages


def test_a_fresh_process_loads_it_fast_and_predicts_a_stored_shard(registered, tmp_path):
    uri, model_uri, sae, acts, shard, _ = registered
    codes = sae.encode(torch.from_numpy(acts))
    expected = torch.zeros(ROWS, N).scatter_(1, codes.idx, codes.vals).numpy()
    script = (
        "import sys, time, numpy as np, mlflow\n"
        "start = time.perf_counter()\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "import sae_core\n"
        "from sae_core.storage.layout import read_activations\n"
        "latents = model.predict(read_activations(sys.argv[2]))\n"
        "seconds = time.perf_counter() - start\n"
        "np.save('latents.npy', latents)\n"
        "files = {m.__file__ for n, m in sys.modules.items() if n.startswith('sae_core')}\n"
        "print(seconds, sae_core.__file__, *sorted(files), sep='\\n')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAEFLOW", "PREFECT"))}
    proc = subprocess.run(
        [sys.executable, "-c", script, model_uri, str(shard)],
        cwd=tmp_path,
        env={**env, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]
    seconds, package, *files = proc.stdout.split()
    # The model's own copy of the code, not this checkout's.
    model_code = Path(package).parent.parent
    repo = Path(__file__).resolve().parents[2]
    assert model_code.name == "code" and not model_code.is_relative_to(repo)
    assert all(Path(f).is_relative_to(model_code) for f in files)
    np.testing.assert_allclose(np.load(tmp_path / "latents.npy"), expected, rtol=1e-5, atol=1e-6)
    # Loading used to build the C++ kernels for the model's copy of their sources (~80 s
    # here); well under a minute leaves room for a loaded machine (~5 s measured idle).
    assert float(seconds) < 30, seconds
