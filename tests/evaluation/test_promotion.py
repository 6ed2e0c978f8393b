"""The promotion gate and its locking, over an in-memory registry: no MLflow, no Prefect."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from functools import partial

import pytest

from sae_core.errors import ConfigError, LockTimeout
from sae_core.evaluation.promotion import PromotionPolicy, decide, nominate, promote
from sae_core.storage.locks import file_lock

BASE = {"ce_loss_recovered": 0.90, "l0": 32.0, "dead_fraction": 0.05, "nmse": 0.20}


class FakeRegistry:
    """Versions with metrics, aliases, tags; `challengers` queues what the alias reads return."""

    def __init__(self, metrics: dict[str, dict[str, float]], aliases: dict[str, str], delay=None):
        self._metrics = metrics
        self.aliases = dict(aliases)
        self.tags: dict[str, dict[str, str]] = {}
        self.challengers: list[str] = []
        self.delay = delay or {}

    def version_for_alias(self, name, alias):
        if alias == "challenger" and self.challengers:
            return self.challengers.pop(0)
        return self.aliases.get(alias)

    def metrics(self, name, version):
        time.sleep(self.delay.get(version, 0.0))  # widens the read-decide-write window
        return self._metrics[version]

    def set_alias(self, name, alias, version):
        self.aliases[alias] = version

    def tag_version(self, name, version, tags):
        self.tags.setdefault(version, {}).update(tags)


def with_(**changes: float) -> dict[str, float]:
    return {**BASE, **changes}


POLICY = PromotionPolicy()


def test_better_challenger_is_promoted():
    decision = decide(with_(ce_loss_recovered=0.92), BASE, POLICY)
    assert decision.promote, decision
    assert {c.name for c in decision.checks} == {"l0", "ce_loss_recovered", "dead_fraction", "nmse"}


def test_worse_challenger_is_rejected():
    decision = decide(with_(ce_loss_recovered=0.85), BASE, POLICY)
    assert not decision.promote and "ce_loss_recovered" in decision.reason


def test_equal_within_the_minimum_improvement_is_rejected():
    decision = decide(with_(ce_loss_recovered=0.904), BASE, POLICY)
    assert not decision.promote and decision.reason == "gate failed on ce_loss_recovered"


def test_no_champion_promotes_the_first_model():
    decision = decide(BASE, None, POLICY)
    assert decision.promote and "first model" in decision.reason


def test_guard_blocks_a_gain_bought_with_dead_latents():
    decision = decide(with_(ce_loss_recovered=0.95, dead_fraction=0.10), BASE, POLICY)
    assert not decision.promote and decision.reason == "gate failed on dead_fraction"


def test_incomparable_l0_is_rejected():
    decision = decide(with_(ce_loss_recovered=0.95, l0=64.0), BASE, POLICY)
    assert not decision.promote and "l0" in decision.reason


def test_lower_is_better_primary_and_nan_challenger():
    policy = PromotionPolicy(primary="nmse", min_improvement=0.01, guards={})
    assert decide(with_(nmse=0.15), BASE, policy).promote
    assert not decide(with_(nmse=0.195), BASE, policy).promote
    assert not decide(with_(nmse=float("nan")), BASE, policy).promote


def test_saebench_figures_guard_the_gate_in_their_own_direction():
    policy = PromotionPolicy(guards={"absorption_full": 0.02, "sparse_probe_acc_k1": 0.01})
    champion = with_(absorption_full=0.10, sparse_probe_acc_k1=0.80)
    better = with_(ce_loss_recovered=0.95, absorption_full=0.11, sparse_probe_acc_k1=0.795)
    assert decide(better, champion, policy).promote
    absorbs = with_(ce_loss_recovered=0.95, absorption_full=0.15, sparse_probe_acc_k1=0.80)
    assert decide(absorbs, champion, policy).reason == "gate failed on absorption_full"
    probes_worse = with_(ce_loss_recovered=0.95, absorption_full=0.10, sparse_probe_acc_k1=0.7)
    assert decide(probes_worse, champion, policy).reason == "gate failed on sparse_probe_acc_k1"
    # A challenger without the figure (the stage was off) fails the guard.
    assert not decide(with_(ce_loss_recovered=0.95), champion, policy).promote


def test_policy_rejects_unknown_metrics():
    with pytest.raises(ValueError, match="unknown metric 'accuracy'"):
        PromotionPolicy(primary="accuracy")
    with pytest.raises(ValueError, match="slack"):
        PromotionPolicy(guards={"nmse": -1})


def test_promote_moves_the_alias_and_tags_both_versions():
    reg = FakeRegistry(
        {"1": BASE, "2": with_(ce_loss_recovered=0.93)}, {"champion": "1", "challenger": "2"}
    )
    result = promote(reg, "m", POLICY)
    assert result.decision.promote and reg.aliases["champion"] == "2"
    assert reg.tags["2"]["saeflow.promotion.decision"] == "promoted"
    assert reg.tags["2"]["saeflow.promotion.compared_with"] == "1"
    assert "challenger=0.93 champion=0.9" in reg.tags["2"]["saeflow.promotion.ce_loss_recovered"]
    assert reg.tags["1"]["saeflow.promotion.replaced_by"] == "2"
    # Promoting again is a no-op: the challenger is already champion.
    again = promote(reg, "m", POLICY)
    assert not again.decision.promote and "already champion" in again.decision.reason
    assert not result.rejected and not again.rejected  # `saeflow promote` exits 0 on both


def test_rejection_is_recorded_and_the_champion_stays():
    reg = FakeRegistry(
        {"1": BASE, "2": with_(ce_loss_recovered=0.80)}, {"champion": "1", "challenger": "2"}
    )
    result = promote(reg, "m", POLICY)
    assert reg.aliases["champion"] == "1" and result.champion_after == "1"
    assert reg.tags["2"]["saeflow.promotion.decision"] == "rejected"
    assert result.rejected  # `saeflow promote` exits 3


def test_dry_run_decides_but_writes_nothing():
    reg = FakeRegistry({"2": BASE}, {"challenger": "2"})
    result = promote(reg, "m", POLICY, dry_run=True)
    assert result.decision.promote and result.champion_after == "2"
    assert "champion" not in reg.aliases and reg.tags == {}


def test_a_new_version_becomes_challenger():
    reg = FakeRegistry({}, {})
    first = nominate(reg, "m", "1")
    assert first.moved and first.before is None and reg.aliases["challenger"] == "1"
    second = nominate(reg, "m", "2")
    assert second.moved and (second.before, second.after) == ("1", "2")


def test_an_older_version_never_takes_challenger_back():
    """The run of an older configuration (another state directory, an empty cache: it finds
    version 1 registered) leaves challenger on the newer version 3."""
    reg = FakeRegistry({}, {"challenger": "3", "champion": "2"})
    result = nominate(reg, "m", "1")
    assert not result.moved and result.after == "3" and reg.aliases["challenger"] == "3"
    assert not nominate(reg, "m", "3").moved  # the newest itself: already there


def test_the_newest_version_takes_challenger_back_from_an_older_one():
    """A re-run of the newest configuration (all cached) moves the alias back when something
    moved it to an older version; versions compare as numbers."""
    reg = FakeRegistry({}, {"challenger": "9"})
    result = nominate(reg, "m", "10")
    assert result.moved and reg.aliases["challenger"] == "10"
    assert reg.aliases.get("champion") is None  # only the named alias moves


def test_missing_challenger_is_a_user_error():
    with pytest.raises(ConfigError, match="no version with alias 'challenger'"):
        promote(FakeRegistry({}, {}), "m", POLICY)


def _race(reg: FakeRegistry, lock) -> list:
    """Two promotions at once: the challenger alias moves from 2 to 3 between their reads."""
    reg.challengers = ["2", "3"]
    results: list = []

    def one():
        results.append(promote(reg, "m", POLICY, lock=lock))

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # the first thread reads challenger 2, the second 3
    for t in threads:
        t.join()
    return results


def _race_registry() -> FakeRegistry:
    # v2 beats v1; v3 beats v1 but not v2. B (v3) reads slower, so unlocked it writes last.
    metrics = {
        "1": with_(ce_loss_recovered=0.80),
        "2": with_(ce_loss_recovered=0.90),
        "3": with_(ce_loss_recovered=0.85),
    }
    return FakeRegistry(metrics, {"champion": "1"}, delay={"1": 0.2, "3": 0.3})


def test_two_promotions_at_once_are_serialised_by_the_lock(tmp_path):
    reg = _race_registry()
    results = _race(reg, partial(file_lock, tmp_path / "promote-m.lock"))
    # The second promotion compared v3 against v2, the champion the first one left.
    assert reg.aliases["champion"] == "2"
    by_challenger = {r.challenger: r for r in results}
    assert by_challenger["3"].champion_before == "2" and not by_challenger["3"].decision.promote


def test_without_the_lock_the_race_crowns_the_worse_model():
    reg = _race_registry()
    _race(reg, lock=nullcontext)
    assert reg.aliases["champion"] == "3"  # what the lock prevents


def test_lock_times_out_with_a_clear_message(tmp_path):
    path = tmp_path / "held.lock"
    with file_lock(path):
        with pytest.raises(LockTimeout, match="held by another process"):
            with file_lock(path, timeout=0.2):
                pass
    with file_lock(path, timeout=0.2):  # released when the holder's block ends
        pass
