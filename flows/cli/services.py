"""`saeflow services up | down | status | env | bucket`: the local servers
(deployments/services.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.errors import one_line_errors
from flows.cli.options import JsonOpt, check_port

if TYPE_CHECKING:
    from deployments.state import Service, ServiceStatus

app = typer.Typer(
    no_args_is_help=True,
    help="Local servers the pipeline can use; state in $SAEFLOW_HOME/services.",
)
ServiceNames = Annotated[
    list[str] | None, typer.Argument(help="Services to act on (default: all).", show_default=False)
]


def _services(
    names: list[str] | None,
    s3_port: int | None = None,
    port_base: int | None = None,
    database: str | None = None,
) -> list[Service]:
    """database: what MLflow and Prefect keep their data in (None: the remembered choice)."""
    from deployments.services import select

    ports = {"s3_port": s3_port, "port_base": port_base}
    servers = {"database": database} if database else {}
    with one_line_errors(ValueError):  # an unknown service name
        if s3_port is not None:
            check_port("--s3-port", s3_port)
        if port_base:  # SeaweedFS serves port_base+1..+4 and gRPC 10000 above each
            check_port("--port-base", port_base, highest=65535 - 10_004)
        options = {"seaweedfs": {k: v for k, v in ports.items() if v is not None}}
        return select(names, options | {"mlflow": servers, "prefect": servers})


def _say(status: ServiceStatus) -> None:
    state = "serving" if status.serving else "running, not serving" if status.running else "stopped"
    where = f" at {status.endpoint} (pid {status.pid})" if status.running else ""
    typer.echo(f"{status.name}: {state}{where}; {status.detail}")


@app.command("up")
def services_up(
    names: ServiceNames = None,
    db: Annotated[
        str | None,
        typer.Option(
            help="What MLflow and Prefect keep their data in: sqlite or postgres (a PostgreSQL "
            "on loopback, for teams). Remembered for later `up`s; default: the last one, "
            "else sqlite.",
            show_default=False,
        ),
    ] = None,
    s3_port: Annotated[int, typer.Option(help="SeaweedFS S3 port.")] = 8333,
    port_base: Annotated[
        int, typer.Option(help="Shift SeaweedFS's internal ports (0: its defaults).")
    ] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each service.")] = 60.0,
) -> None:
    """Start the services (idempotent), wait until each serves, print the environment to use."""
    from deployments.servers import check_database, choose_database, chosen_database
    from deployments.services import SERVICES, export_lines

    with one_line_errors(ValueError):
        database = check_database(db or chosen_database())
    if not names:  # PostgreSQL only where the servers use it
        names = [n for n in SERVICES if n != "postgres" or database == "postgres"]
    for service in _services(names, s3_port, port_base, database):
        # A missing binary, a server that exits or never answers.
        with one_line_errors(FileNotFoundError, RuntimeError, TimeoutError):
            _say(service.up(timeout))
        if lines := export_lines(service.env(reveal=False), reveal=False):
            typer.echo("\n".join(lines))
    choose_database(database)  # once it serves: the next `up` keeps it
    typer.echo('# or: eval "$(saeflow services env)"')


@app.command("down")
def services_down(
    names: ServiceNames = None,
    purge: Annotated[
        bool,
        typer.Option(
            "--purge", help="Also remove their data, credentials and logs (cannot be undone)."
        ),
    ] = False,
) -> None:
    """Stop the services by their recorded pids; their data stays for the next `up` unless
    --purge."""
    for service in reversed(_services(names)):  # dependents first: MLflow stores on SeaweedFS
        status = service.down()
        _say(status)
        if purge and not status.running and (purged := service.purge()) is not None:
            size = purged.size_bytes / 2**20
            typer.echo(
                f"{service.name}: removed {purged.path} ({size:.1f} MiB: its data, "
                "credentials and log)"
            )


@app.command("status")
def services_status(names: ServiceNames = None, json_out: JsonOpt = False) -> None:
    """Whether each service runs and serves, where, and where its state lives."""
    import dataclasses
    import json

    statuses = [service.status() for service in _services(names)]
    if json_out:
        typer.echo(json.dumps({s.name: dataclasses.asdict(s) for s in statuses}))
    for status in statuses if not json_out else []:
        _say(status)


@app.command("env")
def services_env(names: ServiceNames = None) -> None:
    """Print `export` lines, secrets included, for `eval "$(saeflow services env)"`."""
    from deployments.services import export_lines

    for service in _services(names):
        if lines := export_lines(service.env(reveal=True), reveal=True):
            typer.echo("\n".join(lines))


@app.command("bucket")
def services_bucket(
    name: Annotated[str, typer.Argument(help="The bucket to create, e.g. `team-store`.")],
) -> None:
    """Create a bucket on the running SeaweedFS: no store ever creates one implicitly (a
    mistyped bucket is an error, not a new store)."""
    from deployments.seaweedfs import SeaweedFS

    with one_line_errors(ValueError, RuntimeError):  # a bad name; the server is not running
        created = SeaweedFS().create_bucket(name)
    state = "created" if created else "exists already"
    typer.echo(f"bucket {name}: {state}; use it as --store s3://{name}/PREFIX")
