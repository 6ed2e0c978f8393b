"""The `saeflow` command line: one module per command group, assembled here.

Start-up stays fast (`saeflow bench cli` measures it): at import only typer, rich, pydantic and
saeflow's leaves load; a command imports torch, pyarrow, Prefect or MLflow when it runs. Every
command fails on bad input the same way (flows/cli/errors.py).
"""

from __future__ import annotations

import gc
import sys

import typer

from flows.cli import bench, housekeeping, models, pipeline, services, study, view
from sae_core import stopping

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train and evaluate sparse autoencoders."
)
# Unnamed groups merge their commands into `saeflow`; help lists them in this order.
for commands in (pipeline.app, models.app, view.app, housekeeping.app):
    app.add_typer(commands)
app.add_typer(bench.app, name="bench")
app.add_typer(services.app, name="services")
app.add_typer(study.app, name="study")


def main() -> None:
    """The console script: `app`, with Ctrl-C ending it as a shell expects (exit code 130)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if stopping.requested() is not None:
            # Stopped: exit now. The interpreter's last garbage collection, over torch's,
            # Prefect's and pydantic's objects, takes seconds on a busy machine; the memory
            # goes back whole anyway.
            gc.freeze()
