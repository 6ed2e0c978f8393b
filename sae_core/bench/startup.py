"""Start-up benchmark: wall seconds of the installed `saeflow` console script (the one next to
this Python) for `saeflow --help` and `saeflow config`, each run `repeats` times as a fresh
process: what a user waits for before any command does work. Target: median < 0.5 s.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

from sae_core.bench.measure import load_average, timed
from sae_core.bench.options import CliBench
from sae_core.errors import ConfigError

COMMANDS = ("--help", "config")  # each as `saeflow COMMAND`


def _installed_script() -> Path:
    """The `saeflow` console script of this Python's environment."""
    script = Path(sys.executable).parent / "saeflow"
    if not script.is_file():
        raise ConfigError(
            f"no saeflow command at {script}; install the package into this environment "
            "(pip install -e .)"
        )
    return script


def bench_cli(options: CliBench, *, verbose: bool = True) -> dict[str, Any]:
    """Median, fastest and slowest seconds of each command over `options.repeats` runs."""
    script = _installed_script()
    result: dict[str, Any] = {"script": str(script), "repeats": options.repeats, "commands": {}}
    for command in COMMANDS:
        seconds = [
            timed(partial(subprocess.run, [script, command], check=True, capture_output=True))
            for _ in range(options.repeats)
        ]
        result["commands"][f"saeflow {command}"] = {
            "median_s": round(statistics.median(seconds), 3),
            "min_s": round(min(seconds), 3),
            "max_s": round(max(seconds), 3),
        }
    result["load_average"] = load_average()
    if verbose:
        print(f"{script}, {options.repeats} runs each, load average {result['load_average']}")
        for command, s in result["commands"].items():
            print(
                f"  {command:<16} median {s['median_s']:.3f} s   min {s['min_s']:.3f}   "
                f"max {s['max_s']:.3f}   (target: median < 0.5 s)"
            )
    return result
