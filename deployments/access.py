"""Whether the servers the environment names let this client in, checked in seconds before a
command starts its work: a missing or wrong credential is one line that names the fix, not a
traceback ending in a 401 (after a whole pipeline ran, for MLflow's registration).

Only servers the environment names are checked (PREFECT_API_URL; an http(s)
MLFLOW_TRACKING_URI); one that does not answer is left to the command's own error.
"""

from __future__ import annotations

import base64
import os
import re
import sys
import urllib.error
import urllib.request

from sae_core.errors import AccessDenied

FIX = 'eval "$(saeflow services env)"'


def denied(service: str, url: str, status: int, variables: str) -> AccessDenied:
    """The one line for a server that refused this client's credentials."""
    return AccessDenied(
        f"{service} at {url} refused the request ({status}): {variables} missing or wrong; "
        f"for `saeflow services` run {FIX}"
    )


def _status(url: str, basic: str | None) -> int | None:
    """The HTTP status of a GET with HTTP basic auth `user:password`; None: no answer."""
    request = urllib.request.Request(url)
    if basic:
        request.add_header("Authorization", f"Basic {base64.b64encode(basic.encode()).decode()}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def check_access() -> None:
    """Raise AccessDenied when the Prefect or MLflow server in the environment refuses us."""
    if api := os.environ.get("PREFECT_API_URL"):
        status = _status(
            f"{api.rstrip('/')}/admin/version", os.environ.get("PREFECT_API_AUTH_STRING")
        )
        if status in (401, 403):
            raise denied("the Prefect server", api, status, "PREFECT_API_AUTH_STRING")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
        search = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1"
        status = _status(search, f"{user}:{password}" if user or password else None)
        if status in (401, 403):
            variables = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
            raise denied("the MLflow server", uri, status, variables)


def refused(err: BaseException) -> AccessDenied | None:
    """The one line for a 401/403 from the Prefect or MLflow client raised mid-command; None
    for anything else. Their exception classes are looked up only where already imported (an
    error from a library means the library is loaded)."""
    prefect = sys.modules.get("prefect.exceptions")
    if prefect and isinstance(err, prefect.PrefectHTTPStatusError):
        status = err.response.status_code
        if status in (401, 403):
            url = str(err.request.url)
            api = url[: url.index("/api") + 4] if "/api" in url else url
            return denied("the Prefect server", api, status, "PREFECT_API_AUTH_STRING")
    mlflow = sys.modules.get("mlflow.exceptions")
    if mlflow and isinstance(err, mlflow.MlflowException):
        found = re.search(r"error code (401|403)\b", str(err))
        if found:
            uri = os.environ.get("MLFLOW_TRACKING_URI", "the tracking server")
            variables = "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
            return denied("the MLflow server", uri, int(found[1]), variables)
    return None
