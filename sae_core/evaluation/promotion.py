"""The registry's two aliases: which version a run makes `challenger` (`nominate`), and does the
`challenger` replace the `champion` (the promotion gate, `promote`)?

Plain Python over a small registry interface, so the rules and their locking are tested without
MLflow. The gate's rule, in order:
1. no champion yet: the challenger becomes champion;
2. L0 must be comparable (a larger k buys reconstruction with density, not with a better SAE);
3. the primary metric must improve by at least `min_improvement` (a tie within it is no win);
4. every guard metric may worsen by at most its slack.
The challenger is promoted only when every check passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sae_core.errors import ConfigError

CHALLENGER, CHAMPION = "challenger", "champion"
TAG_PREFIX = "saeflow.promotion"

# Which way is better for each metric a gate may compare.
DIRECTIONS: dict[str, Literal["higher", "lower"]] = {
    "ce_loss_recovered": "higher",
    "delta_lm_loss": "lower",
    "ce_spliced": "lower",
    "nmse": "lower",
    "dead_fraction": "lower",
    # SAEBench's offline evaluations (sae_core.stages.saebench), logged with the evaluation's.
    "explained_variance": "higher",
    "cossim": "higher",
    "l2_ratio": "higher",  # shrinkage: below 1 is the usual failure
    "alive_fraction": "higher",
    "latents_over_1pct": "lower",
    "latents_over_10pct": "lower",
    "mean_max_decoder_cosine": "lower",
    "max_decoder_cosine": "lower",
    "absorption_full": "lower",
    "absorption_fraction": "lower",
    **{f"sparse_probe_acc_k{k}": "higher" for k in (1, 2, 5, 10, 20)},
}


class PromotionPolicy(BaseModel):
    """What the gate compares. Slack and improvement are absolute, in the metric's own units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    primary: str = Field("ce_loss_recovered", description="The metric that must improve.")
    min_improvement: float = Field(0.005, ge=0, description="Least gain on the primary metric.")
    l0_tolerance: float = Field(
        0.1, ge=0, description="Largest relative L0 difference still called comparable."
    )
    guards: dict[str, float] = Field(
        default_factory=lambda: {"dead_fraction": 0.02, "nmse": 0.01},
        description="metric -> how much worse than the champion it may get.",
    )

    @field_validator("primary")
    @classmethod
    def _known_primary(cls, metric: str) -> str:
        _check_known(metric)
        return metric

    @field_validator("guards")
    @classmethod
    def _known_guards(cls, guards: dict[str, float]) -> dict[str, float]:
        for metric, slack in guards.items():
            _check_known(metric)
            if slack < 0:
                raise ValueError(f"guard {metric}: slack {slack} must be >= 0")
        return guards


def _check_known(metric: str) -> None:
    if metric not in DIRECTIONS:
        raise ValueError(f"unknown metric '{metric}'; choose from {', '.join(DIRECTIONS)}")


class Check(BaseModel):
    """One comparison the gate made, with both figures and the limit it applied."""

    name: str
    passed: bool
    challenger: float | None
    champion: float | None
    rule: str


class Decision(BaseModel):
    promote: bool
    reason: str
    checks: list[Check] = []


class PromotionResult(BaseModel):
    """What a promotion did: the versions compared, the decision, and whether it was applied."""

    model: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    decision: Decision
    dry_run: bool

    @property
    def rejected(self) -> bool:
        """The gate compared the two and kept the champion (a challenger that already is
        champion is no rejection: nothing was compared)."""
        return not self.decision.promote and self.champion_before != self.challenger


class Registry(Protocol):
    """The registry operations a promotion needs (MLflow's, in tasks/registry.py)."""

    def version_for_alias(self, name: str, alias: str) -> str | None: ...
    def metrics(self, name: str, version: str) -> dict[str, float]: ...
    def set_alias(self, name: str, alias: str, version: str) -> None: ...
    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None: ...


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _gain(metric: str, challenger: float, champion: float) -> float:
    """How much better the challenger is (negative: worse), whatever the metric's direction."""
    delta = challenger - champion
    return delta if DIRECTIONS[metric] == "higher" else -delta


def decide(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, policy: PromotionPolicy
) -> Decision:
    """Apply the gate to two versions' evaluation metrics (champion None: there is none yet).

    A champion without a figure for some metric (an older version) does not block that check;
    a challenger without one fails it.
    """
    if champion is None:
        return Decision(promote=True, reason="no champion yet: the first model becomes champion")
    c_l0, h_l0 = challenger.get("l0"), champion.get("l0")
    l0_ok = _finite(c_l0) and _finite(h_l0)
    checks = [
        Check(
            name="l0",
            passed=l0_ok and abs(c_l0 - h_l0) <= policy.l0_tolerance * max(abs(h_l0), 1e-12),
            challenger=c_l0,
            champion=h_l0,
            rule=f"within {policy.l0_tolerance:.0%} of the champion's",
        )
    ]
    better = "higher" if DIRECTIONS[policy.primary] == "higher" else "lower"
    limits = [
        (policy.primary, policy.min_improvement, f"{better} by >= {policy.min_improvement:g}")
    ]
    limits += [
        (guard, -slack, f"no worse than the champion's by more than {slack:g}")
        for guard, slack in policy.guards.items()
    ]
    for metric, least_gain, rule in limits:
        c, h = challenger.get(metric), champion.get(metric)
        passed = _finite(c) and (not _finite(h) or _gain(metric, c, h) >= least_gain)
        checks.append(Check(name=metric, passed=passed, challenger=c, champion=h, rule=rule))

    failed = [check.name for check in checks if not check.passed]
    if failed:
        return Decision(promote=False, reason=f"gate failed on {', '.join(failed)}", checks=checks)
    return Decision(promote=True, reason=f"{policy.primary} improved; guards held", checks=checks)


def decision_tags(decision: Decision, champion: str | None) -> dict[str, str]:
    """The decision and the compared figures as registry tags on the challenger version."""
    tags = {
        f"{TAG_PREFIX}.decision": "promoted" if decision.promote else "rejected",
        f"{TAG_PREFIX}.reason": decision.reason,
        f"{TAG_PREFIX}.compared_with": champion or "none",
        f"{TAG_PREFIX}.at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for check in decision.checks:
        tags[f"{TAG_PREFIX}.{check.name}"] = (
            f"{'pass' if check.passed else 'FAIL'}: challenger={check.challenger} "
            f"champion={check.champion} ({check.rule})"
        )
    return tags


class Nomination(BaseModel):
    """What a run did to the alias it moves: its version, and where the alias pointed before
    and after."""

    model: str
    alias: str
    version: str
    before: str | None
    after: str

    @property
    def moved(self) -> bool:
        return self.before != self.after


def nominate(
    registry: Registry,
    name: str,
    version: str,
    alias: str = CHALLENGER,
    lock: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> Nomination:
    """Point `alias` at a run's `version` when that version is newer (a higher number) than the
    one the alias points at, or the alias is unset; otherwise leave it.

    Decided from the registry alone, never from a cache: the run that registers a new version
    moves the alias to it; a re-run of an older configuration, cached or not and from any state
    directory, leaves it; the re-run of a run killed between registering and moving the alias
    moves it. Read and write happen under `lock` (the promotion's), so a promotion never reads
    a half-made move.
    """
    with lock():
        before = registry.version_for_alias(name, alias)
        after = before
        if before is None or int(version) > int(before):
            registry.set_alias(name, alias, version)
            after = version
    return Nomination(model=name, alias=alias, version=version, before=before, after=after)


def challenger_version(registry: Registry, name: str) -> str:
    """The version `challenger` points at; ConfigError if the model has none (or is unknown)."""
    challenger = registry.version_for_alias(name, CHALLENGER)
    if challenger is None:
        raise ConfigError(
            f"model '{name}' has no version with alias '{CHALLENGER}': "
            "register one first (saeflow run) or check the model name"
        )
    return challenger


def promote(
    registry: Registry,
    name: str,
    policy: PromotionPolicy,
    dry_run: bool = False,
    lock: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> PromotionResult:
    """Compare `challenger` with `champion` and move `champion` when the gate passes.

    Read, decide and write happen under `lock`, so two promotions of one model run one after
    the other and the second compares against whatever the first left as champion. A dry run
    reads and decides but writes nothing.
    """
    with nullcontext() if dry_run else lock():
        challenger = challenger_version(registry, name)
        champion = registry.version_for_alias(name, CHAMPION)
        if champion == challenger:
            decision = Decision(promote=False, reason=f"version {challenger} is already champion")
        else:
            champion_metrics = None if champion is None else registry.metrics(name, champion)
            decision = decide(registry.metrics(name, challenger), champion_metrics, policy)
            if not dry_run:
                registry.tag_version(name, challenger, decision_tags(decision, champion))
            if decision.promote and not dry_run:
                registry.set_alias(name, CHAMPION, challenger)
                if champion is not None:
                    registry.tag_version(name, champion, {f"{TAG_PREFIX}.replaced_by": challenger})
    return PromotionResult(
        model=name,
        challenger=challenger,
        champion_before=champion,
        champion_after=challenger if decision.promote else champion,
        decision=decision,
        dry_run=dry_run,
    )
