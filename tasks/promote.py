"""Prefect tasks over MLflow's aliases, under one lock per model: a run's nomination of its version
(`challenger`) and the promotion gate (`champion`). Never cached: each reads the registry as it
is now."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sae_core.env import saeflow_home
from sae_core.evaluation.promotion import (
    Nomination,
    PromotionPolicy,
    PromotionResult,
    nominate,
    promote,
)
from sae_core.storage.locks import file_lock
from tasks.common import TASK_DEFAULTS
from tasks.registry import MlflowRegistry, RegistryRef


def lock_path(name: str) -> Path:
    """One lock file per model in the state directory: promotions of one model take turns."""
    return saeflow_home() / "locks" / f"promote-{name}.lock"


NEVER_CACHED = {**TASK_DEFAULTS, "cache_policy": NO_CACHE}


@task(name="nominate_version", **NEVER_CACHED)
def nominate_version(registered: RegistryRef, alias: str) -> Nomination:
    """Move `alias` to the run's version if it is the newest (sae_core.evaluation.promotion.nominate)."""
    name = registered.name
    result = nominate(
        MlflowRegistry(), name, registered.version, alias, lock=partial(file_lock, lock_path(name))
    )
    print(nomination_line(result))
    return result


def nomination_line(n: Nomination) -> str:
    head = f"{n.model}: @{n.alias}"
    if n.moved:
        return f"{head} moved from version {n.before or '(none)'} to {n.version}, this run's"
    if n.after == n.version:
        return f"{head} already at this run's version {n.version}"
    return f"{head} stays at version {n.after}: this run's version {n.version} is older"


@task(name="promote_model", **NEVER_CACHED)
def promote_model(name: str, policy: PromotionPolicy, dry_run: bool = False) -> PromotionResult:
    lock = partial(file_lock, lock_path(name))
    result = promote(MlflowRegistry(), name, policy, dry_run, lock=lock)
    create_markdown_artifact(
        key="promotion", description=f"promotion of {name}", markdown=decision_markdown(result)
    )
    return result


def decision_markdown(result: PromotionResult) -> str:
    """The decision in one line, then the compared figures as a table (also the CLI's output)."""
    d = result.decision
    if d.promote:
        verb = "would promote" if result.dry_run else "promoted"
        what = f"{verb} version {result.challenger} to champion"
    else:
        what = f"kept champion {result.champion_before} (challenger {result.challenger})"
    lines = [f"**{result.model}**: {what}: {d.reason}"]
    if result.dry_run:
        lines.append("\n_dry run: nothing changed_")
    if d.checks:
        lines += ["", "| check | challenger | champion | rule | result |", "|---|---|---|---|---|"]
        lines += [
            f"| {c.name} | {_fmt(c.challenger)} | {_fmt(c.champion)} | {c.rule} | "
            f"{'pass' if c.passed else '**FAIL**'} |"
            for c in d.checks
        ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
