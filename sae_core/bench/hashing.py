"""Fingerprint benchmark: seconds to name a model by its content, as every run does before its
first stage (`stages.location.model_identity`). The first time every file is read and hashed;
on a re-run the remembered digests (`storage.digests`, here in a scratch folder) are looked up
by each file's identity. Targets for the 540 MB demo model: first < 2 s, re-run < 0.2 s.
"""

from __future__ import annotations

import statistics
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from sae_core.bench.measure import load_average, timed
from sae_core.bench.options import HashBench
from sae_core.data.assets import resolve_model_path
from sae_core.errors import ConfigError
from sae_core.storage.fingerprint import path_fingerprint


def bench_hash(options: HashBench, *, verbose: bool = True) -> dict[str, Any]:
    """Seconds of the first fingerprint (nothing remembered) and of `repeats` re-runs."""
    folder = Path(resolve_model_path(options.model))
    if not folder.is_dir():
        raise ConfigError(f"--model {options.model}: not a local model folder or demo name")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    with tempfile.TemporaryDirectory(prefix="saeflow-bench-digests-") as cache:
        fingerprint = partial(path_fingerprint, str(folder), Path(cache))
        first = timed(fingerprint)
        again = [timed(fingerprint) for _ in range(options.repeats)]
    result = {
        "model": str(folder),
        "mb": round(size / 1e6, 1),
        "first_s": round(first, 3),
        "first_mb_per_s": round(size / 1e6 / first),
        "rerun_median_s": round(statistics.median(again), 4),
        "rerun_max_s": round(max(again), 4),
        "load_average": load_average(),
    }
    if verbose:
        print(f"{folder}: {result['mb']} MB, load average {result['load_average']}")
        print(f"  first   {first:.3f} s ({result['first_mb_per_s']} MB/s)   (target < 2 s)")
        print(
            f"  re-run  median {result['rerun_median_s']:.4f} s   max {result['rerun_max_s']:.4f}"
            f" s over {options.repeats}   (target < 0.2 s)"
        )
    return result
