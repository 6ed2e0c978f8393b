"""Prefect task: fit the scaling law L(n, k) to a sweep's evaluated SAEs."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from sae_core.studies.scaling import ScalingFit, fit_scaling_law
from sae_core.studies.sweep import SweepPoint
from tasks.common import TASK_DEFAULTS


# Seconds of work and a pure function of its inputs: recomputed rather than cached.
@task(name="fit_scaling_law", cache_policy=NO_CACHE, **TASK_DEFAULTS)
def fit_scaling(points: list[SweepPoint]) -> ScalingFit | None:
    """The law fitted to the eval NMSE of every point (a transcoder's: of its output hook's
    activation y); None with fewer than 2 points."""
    if len(points) < 2:
        return None
    return fit_scaling_law(
        [p.n for p in points], [p.k for p in points], [p.metrics["nmse"] for p in points]
    )
