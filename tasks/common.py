"""What every saeflow task shares: result persistence without pickle, retries on transient errors."""

from __future__ import annotations

from typing import Any

from prefect.tasks import exponential_backoff
from pydantic import ValidationError

from sae_core.errors import ConfigError, StoreError, ValidationFailed

# User errors and failed checks are final: retrying would only repeat them. FileNotFoundError
# (a missing input) is final although it is an OSError; other OSErrors (connection resets,
# timeouts, a flaky disk) and the S3/HTTP clients' errors are worth another try.
FINAL_ERRORS = (ConfigError, StoreError, ValidationFailed, ValidationError, FileNotFoundError)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except FINAL_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - storage and network errors are worth another try
        return True
    return False


TASK_DEFAULTS: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",
    "retries": 3,
    # About 2, 4, 8 s: each delay is drawn at random around its average (at most 1.5x) so that
    # tasks failing together (one S3 outage) do not retry in lockstep.
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient,
}
