"""Prefect caching that never serves a reference to data the store no longer holds."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.utilities.hashing import hash_objects

from sae_core.stages import Location

STANDARD = INPUTS - "progress" + TASK_SOURCE


def _committed(location: Location, args: dict[str, Any]) -> bool:
    return location.committed() is not None


@dataclass
class CommittedOutput(CachePolicy):
    """INPUTS + TASK_SOURCE, plus the location the task writes its output to.

    `locate` maps the task's inputs to that Location; it carries the fingerprint of the sae_core
    code, which TASK_SOURCE alone does not see. `is_done` says whether the output is really
    there (default: the dataset is committed); `run_stage` uses it to refresh the cache entry
    instead of serving it when the output is gone.
    """

    locate: Callable[..., Location] | None = None
    is_done: Callable[[Location, dict[str, Any]], bool] = _committed

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        location = self.locate(**_key_inputs(inputs))
        base = STANDARD.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        return hash_objects(base, tuple(location))

    def output_missing(self, inputs: dict[str, Any]) -> bool:
        args = _key_inputs(inputs)
        return not self.is_done(self.locate(**args), args)


def _key_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k != "progress"}


def run_stage(task: Task, **inputs: Any) -> State:
    """Call a stage task; when its output is missing from the store, recompute and re-cache it."""
    policy = task.cache_policy
    if isinstance(policy, CommittedOutput) and policy.output_missing(inputs):
        task = task.with_options(refresh_cache=True)
    return task(**inputs, return_state=True)
