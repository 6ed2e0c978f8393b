"""Every exception saeflow shows a user as one line: what is wrong, naming the field, file or URI,
and the fix. A leaf: it imports nothing of saeflow, so anything may import it, the CLI included,
without loading torch or pyarrow.

Errors that are not listed here (a bug, a killed worker) keep their traceback. Storage failures
(a full disk, an S3 outage) are not user errors: tasks retry them, and once the retries are
spent `storage_failure` turns one into a StoreError for the CLI to print.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user error in the configuration or the command line: one line naming the field and
    the fix."""


class StoreError(RuntimeError):
    """The store cannot be reached or used: the message names the URI and the fix."""


class DatasetDamaged(StoreError):
    """A committed dataset's data no longer matches its manifest (a missing, truncated or
    altered file): the message names the file and the fix; `reason` is the finding alone."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class ValidationFailed(RuntimeError):
    """A dataset failed its checks; the message names the shards and the failed expectations."""


class LockTimeout(TimeoutError):
    """Another process held a lock for longer than the caller would wait."""


class AccessDenied(RuntimeError):
    """A server (Prefect, MLflow) refused this client's credentials: the message names the
    variables and the fix."""


class AssetError(RuntimeError):
    """A demo asset (model or corpus package) cannot be installed: the message says why."""


# Errors a command reports in one line and exits 2 on.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    StoreError,
    ValidationFailed,
    LockTimeout,
    AccessDenied,
)


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a failing disk or S3 endpoint raises (a full disk, a refused connection, a
    timeout). botocore is imported here, when an error is being classified, not at start-up."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, BotoCoreError, ClientError)


def storage_failure(err: BaseException) -> StoreError:
    """A storage error that a stage could not get past (after its retries), as one line."""
    reason = (str(err).strip().splitlines() or [""])[0][:300]
    return StoreError(
        f"storage error ({type(err).__name__}: {reason}); fix the store (disk space, "
        "permissions, S3 server or credentials) and run again: finished stages are kept"
    )
