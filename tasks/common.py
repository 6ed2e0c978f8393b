"""What every saeflow task shares: result persistence without pickle, retries on transient errors."""

from __future__ import annotations

from typing import Any

from sae_core.config import ConfigError
from sae_core.validation import ValidationFailed

# User errors and failed checks are final: retrying would only repeat them.
_FINAL_ERRORS = (ConfigError, ValidationFailed, FileNotFoundError)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except _FINAL_ERRORS:
        return False
    except Exception:  # noqa: BLE001 - storage and network errors are worth another try
        return True
    return False


TASK_DEFAULTS: dict[str, Any] = {
    "persist_result": True,
    "result_serializer": "json",
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_on_transient,
}
