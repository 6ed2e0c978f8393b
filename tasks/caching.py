"""Prefect caching that never serves a reference to data the store no longer holds, and one
computation of a stage's output at a time."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prefect import Task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.states import State
from prefect.utilities.hashing import hash_objects

from sae_core import stopping
from sae_core.env import saeflow_home
from sae_core.stages.location import Location
from sae_core.storage.locks import file_lock

STANDARD = INPUTS - "progress" + TASK_SOURCE

# How a stage ended, as the run's stage table says it.
COMPUTED = "computed"  # the task ran and made its output
CACHED = "cached"  # Prefect's cache answered: the task did not run
REUSED = "reused from the store"  # the task ran and found its output already there


def _committed(location: Location, args: dict[str, Any]) -> bool:
    return location.is_committed()


@dataclass
class CommittedOutput(CachePolicy):
    """INPUTS + TASK_SOURCE, plus the location the task writes its output to.

    `locate` maps the task's inputs to that Location; it carries the fingerprint of the sae_core
    code, which TASK_SOURCE alone does not see. `is_done` says whether the output is really
    there (default: the dataset is committed); `run_stage` uses it to refresh the cache entry
    instead of serving it when the output is gone. `forget` (called with the task's inputs)
    removes the output and whatever the stage would reuse toward it (default: the located
    folder), so that a refreshed stage computes it from the start.
    """

    locate: Callable[..., Location] | None = None
    is_done: Callable[[Location, dict[str, Any]], bool] = _committed
    forget: Callable[..., None] | None = None
    reused: str = REUSED  # what the stage table says when the task found is_done already true

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

    def forget_output(self, inputs: dict[str, Any]) -> None:
        args = _key_inputs(inputs)
        if self.forget is None:
            self.locate(**args).remove()
        else:
            self.forget(**args)


def _key_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in inputs.items() if k != "progress"}


def stage_lock_path(location: Location) -> Path:
    """The lock file of one stage output, in the state directory shared by local runs."""
    key = hashlib.sha256("\n".join(location).encode()).hexdigest()[:32]
    return saeflow_home() / "locks" / f"{key}.lock"


@contextmanager
def stage_locks(locations: Iterable[Location], name: str) -> Iterator[None]:
    """Hold the locks of several stage outputs (each one's `stage_lock_path`), taken in a fixed
    order so that runs locking overlapping sets never wait on each other in a cycle."""
    with ExitStack() as stack:
        for location in sorted(set(locations)):

            def waiting(location: Location = location) -> None:
                print(f"{name}: another run is computing {location.path}; waiting for it")

            stack.enter_context(
                file_lock(stage_lock_path(location), timeout=math.inf, on_wait=waiting)
            )
        yield


class StageRun(NamedTuple):
    """A stage task's final state and how it got there (COMPUTED, CACHED, or its policy's
    `reused`: another run, or another state directory on the same store, made the output)."""

    state: State
    outcome: str

    def result(self) -> Any:
        return self.state.result()


def run_stage(task: Task, refresh: bool = False, **inputs: Any) -> StageRun:
    """Call a stage task; when its output is missing from the store, or `refresh` is set
    (the output is then removed first: `CommittedOutput.forget`), recompute and re-cache it.

    Runs sharing the state directory compute one output at a time: a second run of the same
    stage waits for the first (a kernel lock, released even if its holder is killed), then
    finds the output committed and reuses it instead of clearing and rewriting it. A stop
    requested meanwhile (sae_core.stopping) ends the flow here, before the next stage starts."""
    stopping.check()
    policy = task.cache_policy
    if not isinstance(policy, CommittedOutput):
        state = (task.with_options(refresh_cache=True) if refresh else task)(
            **inputs, return_state=True
        )
        return StageRun(state, CACHED if state.name == "Cached" else COMPUTED)
    with stage_locks([policy.locate(**_key_inputs(inputs))], task.name):
        if refresh:
            policy.forget_output(inputs)
        missing = refresh or policy.output_missing(inputs)
        if missing:
            task = task.with_options(refresh_cache=True)
        state = task(**inputs, return_state=True)
    if state.name == "Cached":
        return StageRun(state, CACHED)
    return StageRun(state, COMPUTED if missing else policy.reused)
