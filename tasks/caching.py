"""Prefect caching that never points at data the store no longer holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from sae_core.stages import Location

STANDARD = INPUTS - "progress" + TASK_SOURCE


@dataclass
class CommittedOutput(CachePolicy):
    """INPUTS + TASK_SOURCE, keyed also by the output's location, and only while it is committed.

    `locate` maps the task's inputs to the Location its output is written to; `is_done` says
    whether that output exists (by default: the dataset is committed). When it does not (deleted, or never finished) the key is None: Prefect runs the task instead
    of returning a cached reference to missing data. The location is part of the key because it
    carries the fingerprint of the sae_core code, which TASK_SOURCE alone does not see.
    """

    locate: Callable[..., Location] | None = None
    is_done: Callable[[Location, dict[str, Any]], bool] = lambda loc, args: (
        loc.committed() is not None
    )

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        args = {k: v for k, v in inputs.items() if k != "progress"}
        location = self.locate(**args)
        if not self.is_done(location, args):
            return None
        base = STANDARD.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return hash_objects(base, tuple(location))
