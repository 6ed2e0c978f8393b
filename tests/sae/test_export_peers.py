"""The exports loaded by the real libraries: SAELens' `SAE.load_from_disk` and sparsify's
`SparseCoder.load_from_disk`, run in a venv of their own (they pin their own dependencies;
saeflow is not installed there) and compared with saeflow's latents and reconstructions.

The venv: SAEFLOW_PEERS_PYTHON, else /work/scratch/peers-venv/bin/python; make one with
`uv venv DIR && uv pip install --python DIR/bin/python --find-links "$PIP_FIND_LINKS"
torch==<saeflow's> sae-lens eai-sparsify`. Skipped with the reason when it is missing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_core.sae.export import export_sae
from tests.helpers import HELPERS
from tests.sae.test_export import ORIGIN, activations, dense, make_sae

PEERS = Path(os.environ.get("SAEFLOW_PEERS_PYTHON", "/work/scratch/peers-venv/bin/python"))


# Slow: one process importing SAELens and sparsify (~1-3 min on a busy 2-core machine).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PEERS.is_file(),
        reason=f"no peers venv at {PEERS} (set SAEFLOW_PEERS_PYTHON; see this module's docstring)",
    ),
]


MODES = ("per_token", "global", "none")


@pytest.fixture(scope="module")
def peer_runs(tmp_path_factory) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Every format x normalisation exported, then run by the libraries in one process."""
    probe = subprocess.run(
        [str(PEERS), "-c", "import sae_lens, sparsify"], capture_output=True, text=True, timeout=300
    )
    if probe.returncode:
        pytest.skip(f"{PEERS} lacks sae-lens or eai-sparsify: {probe.stderr.strip()[-300:]}")
    tmp = tmp_path_factory.mktemp("peers")
    x = activations(256)
    save_file({"x": x.contiguous()}, str(tmp / "x.safetensors"))
    folders = {}
    for fmt in ("saelens", "sparsify"):
        for mode in MODES:
            folders[fmt, mode] = tmp / f"{fmt}-{mode}"
            export_sae(make_sae(mode), folders[fmt, mode], fmt, ORIGIN)
    proc = subprocess.run(
        [str(PEERS), str(HELPERS / "peer_export_worker.py"), str(tmp / "x.safetensors"),
         *map(str, folders.values())],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {key: load_file(str(f.with_suffix(".out.safetensors"))) for key, f in folders.items()}


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("mode", MODES)
def test_the_library_reconstructs_as_saeflow_does(peer_runs, fmt, mode):
    sae, x = make_sae(mode), activations(256)
    out = peer_runs[fmt, mode]
    # SAELens' layer_norm divides by the std + 1e-5: a relative 1e-5 / std here.
    torch.testing.assert_close(out["latents"], dense(sae, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["recon"], sae.reconstruct(x), rtol=1e-4, atol=1e-4)


def test_sparsify_without_the_stated_transform_is_wrong(peer_runs):
    """Why cfg.json and the README state it: the bare library picks other latents, silently."""
    sae, x = make_sae("per_token"), activations(256)
    out = peer_runs["sparsify", "per_token"]
    expected = dense(sae, x) > 0
    torch.testing.assert_close(out["latents"] > 0, expected)
    agree = ((out["latents_bare"] > 0) & expected).sum() / expected.sum()
    assert agree < 0.5, float(agree)
