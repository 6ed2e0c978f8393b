"""`make deploy`: register deployments/prefect.yaml with the Prefect server at PREFECT_API_URL.

Checks the server answers (one clear line if not), creates the process work pool when it is
missing and sets its concurrency limit (SAEFLOW_POOL_CONCURRENCY, 1 by default: a scheduled run
waits for a manual or earlier one instead of sharing the machine with it), then runs `prefect
deploy --all` from the repository root, so that the deployments' working directory is this
checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from sae_core.yaml_files import read_yaml

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DEFAULT_API = "http://127.0.0.1:4200/api"
CONCURRENCY_ENV = "SAEFLOW_POOL_CONCURRENCY"


def work_pools() -> list[str]:
    """The work pool names prefect.yaml's deployments use."""
    spec = read_yaml(PREFECT_FILE.read_text(), str(PREFECT_FILE))
    return sorted({d["work_pool"]["name"] for d in spec["deployments"]})


def server_answers(api: str) -> bool:
    """One quick GET of /health (the client's own retries would take half a minute)."""
    try:
        with urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def pool_concurrency() -> int:
    """How many flow runs the work pool runs at once."""
    value = os.environ.get(CONCURRENCY_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"error: {CONCURRENCY_ENV}={value!r}: expected a whole number >= 1")
    return int(value)


def main() -> int:
    limit = pool_concurrency()
    api = os.environ.setdefault("PREFECT_API_URL", DEFAULT_API)
    if not server_answers(api):
        print(
            f"error: no Prefect server answers at {api}: start one "
            "(`.venv/bin/prefect server start`) or set PREFECT_API_URL",
            file=sys.stderr,
        )
        return 2
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in work_pools():
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                print(f"created process work pool {name}")
            client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=limit))
            print(f"work pool {name}: at most {limit} flow run(s) at once")
    deploy = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    return subprocess.run([*deploy, "--prefect-file", str(PREFECT_FILE)], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
