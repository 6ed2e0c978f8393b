"""Tasks retry storage and network errors with backoff, and never retry user errors."""

from __future__ import annotations

import pytest

from sae_core.errors import ConfigError, ValidationFailed
from sae_core.storage.faults import FaultPlan, InjectedFault
from tasks.common import TASK_DEFAULTS, retry_on_transient


class Failed:
    """Just enough of a Prefect state: result() raises what the task raised."""

    def __init__(self, err: Exception):
        self.err = err

    def result(self):
        raise self.err


@pytest.mark.parametrize("err", [ConfigError("x"), ValidationFailed("x"), FileNotFoundError("x")])
def test_user_errors_are_final(err):
    assert retry_on_transient(None, None, Failed(err)) is False


@pytest.mark.parametrize(
    "err",
    [InjectedFault("disk"), ConnectionResetError("peer"), TimeoutError("s3"), OSError(5, "io")],
)
def test_storage_and_network_errors_are_retried(err):
    assert retry_on_transient(None, None, Failed(err)) is True


def test_backoff_grows_and_is_jittered():
    from prefect import task

    probe = task(**TASK_DEFAULTS)(lambda: None)
    delays = probe.retry_delay_seconds
    assert len(delays) == TASK_DEFAULTS["retries"] == 3
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert 0 < TASK_DEFAULTS["retry_jitter_factor"] <= 1


def test_fault_plan_parses_and_counts():
    plan = FaultPlan.parse("checkpoints/@1x2")
    assert plan == FaultPlan("checkpoints/", 1, 2)
    with pytest.raises(ConfigError, match="SAEFLOW_INJECT_FAULT='nonsense'"):
        FaultPlan.parse("nonsense")


def test_prefect_retries_a_transient_fault_but_not_a_user_error(prefect):
    """Through Prefect's engine: the retry condition sees the exception the task raised."""
    from prefect import flow, task

    calls = {"transient": 0, "user": 0}
    options = {**TASK_DEFAULTS, "retry_delay_seconds": [0.0] * TASK_DEFAULTS["retries"]}

    @task(**options)
    def flaky() -> int:
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise InjectedFault("storage hiccup")
        return 7

    @task(**options)
    def misconfigured() -> int:
        calls["user"] += 1
        raise ConfigError("sae.k=0: choose k >= 1")

    @flow
    def both() -> tuple[int, str]:
        value = flaky()
        state = misconfigured(return_state=True)
        return value, state.type.value

    assert both() == (7, "FAILED")
    assert calls == {"transient": 3, "user": 1}
