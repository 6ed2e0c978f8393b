"""`saeflow services up|down|status|env`: local servers the pipeline can use instead of embedded state.

Each service keeps everything under `$SAEFLOW_HOME/services/<name>/` (owner-only): its data, its
credentials (generated once, then reused, so data written before a restart stays readable), the
record of the running process (`server.json`: pid, endpoint) and its log. `up` is idempotent,
`down` stops the recorded process only if that pid is still the service's own. Services register
in SERVICES; each one is a small class with up, down, status and env.

Secrets appear only in `env(reveal=True)` (the `services env` command, meant for
`eval "$(saeflow services env)"`); everything else prints a command that reads them from their
0600 file instead.
"""

from __future__ import annotations

import shlex

from deployments.postgres import Postgres
from deployments.seaweedfs import SeaweedFS
from deployments.servers import MlflowServer, PrefectServer
from deployments.state import Service


def export_lines(env: dict[str, str], reveal: bool) -> list[str]:
    """`export KEY=value` lines; a value holding `$(cat FILE)` is left for the shell to expand."""
    lines = []
    for key, value in env.items():
        if not reveal and "$(cat " in value:
            lines.append(f'export {key}="{value}"')
        else:
            lines.append(f"export {key}={shlex.quote(value)}")
    return lines


# In start order: MLflow keeps its artifacts on SeaweedFS (remote mode: deployments/servers.py),
# and with `--db postgres` MLflow and Prefect keep their data in PostgreSQL.
SERVICES: dict[str, type[Service]] = {
    SeaweedFS.name: SeaweedFS,
    Postgres.name: Postgres,
    MlflowServer.name: MlflowServer,
    PrefectServer.name: PrefectServer,
}


def select(
    names: list[str] | None = None, options: dict[str, dict[str, object]] | None = None
) -> list[Service]:
    """The named services (all when none are named); `options[name]` goes to that constructor."""
    unknown = [n for n in names or [] if n not in SERVICES]
    if unknown:
        raise ValueError(f"unknown service {', '.join(unknown)}: choose from {', '.join(SERVICES)}")
    options = options or {}
    return [SERVICES[name](**options.get(name, {})) for name in names or SERVICES]
