"""`make deploy`: register deployments/prefect.yaml with the Prefect server at PREFECT_API_URL.

Checks the server answers (one clear line if not), creates the process work pool when it is
missing, then runs `prefect deploy --all` from the repository root, so that the deployments'
working directory is this checkout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from sae_core.config import read_yaml

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
DEFAULT_API = "http://127.0.0.1:4200/api"


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


def main() -> int:
    api = os.environ.setdefault("PREFECT_API_URL", DEFAULT_API)
    if not server_answers(api):
        print(
            f"error: no Prefect server answers at {api}: start one "
            "(`.venv/bin/prefect server start`) or set PREFECT_API_URL",
            file=sys.stderr,
        )
        return 2
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in work_pools():
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
                print(f"created process work pool {name}")
    deploy = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    return subprocess.run([*deploy, "--prefect-file", str(PREFECT_FILE)], cwd=REPO).returncode


if __name__ == "__main__":
    sys.exit(main())
