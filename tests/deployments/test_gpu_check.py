"""deployments/gpu_check.sh runs on a GPU node with torch and triton alone; its --dry-run takes
the same code paths on CPU (tiny shapes, Triton interpreted) and prints the JSON a GPU run
would, which this test reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install '.[triton]')")

SCRIPT = Path(__file__).resolve().parents[2] / "deployments" / "gpu_check.sh"


def test_dry_run_prints_every_figure_of_a_gpu_run():
    env = os.environ | {"PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # standalone: the kernels load by path, saeflow unimported
    done = subprocess.run(
        [str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["dry_run"] and report["k"] == 4
    (shape,) = report["shapes"]
    for field in ("step_ms", "gemm_ms", "ratio_gemm_over_step", "tokens_per_s"):
        assert shape[field] > 0, field
    assert "sparsify" in report
    extraction = report["extraction"]
    assert extraction["layers_run"] == 2 < extraction["layers_total"]
    assert extraction["extract_tokens_per_s"] > 0 and extraction["bare_truncated_tokens_per_s"] > 0


def test_the_script_imports_nothing_of_saeflow():
    """A GPU node may have no saeflow dependencies: the kernels are read by path."""
    text = (SCRIPT.parent / "gpu_check.py").read_text()
    assert "import sae_core" not in text and "from sae_core" not in text
    assert "from sae_core" not in "".join(
        p.read_text() for p in (SCRIPT.parents[1] / "sae_core" / "sae" / "triton").glob("*.py")
    )
