"""`saeflow ls | gc`: what a store holds, and removing what nothing needs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from flows.cli.console import console
from flows.cli.errors import one_line_errors

app = typer.Typer()

StoreArg = Annotated[
    str | None,
    typer.Argument(help="Store URI [default: $SAEFLOW_STORE, else $SAEFLOW_HOME/store]."),
]


@app.command()
def ls(store: StoreArg = None) -> None:
    """List the store's datasets and checkpoints: size, when committed, what each was made
    from, and the registered versions (MLflow) that use it."""
    from rich.table import Table

    from sae_core.storage.store import Store
    from tasks.housekeeping import listing

    with one_line_errors():
        target = Store(store)
        found = listing(target)
    table = Table(title=f"store {target.uri}")
    table.add_column("folder", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("committed (UTC)", no_wrap=True)
    table.add_column("made from", overflow="fold")
    table.add_column("used by", overflow="fold")
    for f in sorted(found.folders, key=lambda f: (f.kind, f.created or 0, f.path)):
        table.add_row(
            f.path,
            _size(f.size),
            _when(f.created) if f.committed else _unfinished(f.kind),
            ", ".join(f.inputs),
            ", ".join(sorted(found.used_by.get(f.path, ()))),
        )
    console.print(table)
    total = sum(f.size for f in found.folders)
    console.print(f"{len(found.folders)} folders, {_size(total)}", highlight=False)
    if found.registry_problem:
        console.print(f"versions unknown: {found.registry_problem}", highlight=False)


@app.command()
def gc(
    store: StoreArg = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would go; remove nothing.")
    ] = False,
    older_than_hours: Annotated[
        float,
        typer.Option(
            min=0, help="Unfinished attempts untouched for this long go (younger: a run at work)."
        ),
    ] = 24.0,
) -> None:
    """Remove what nothing needs: checkpoints of committed SAEs, unfinished attempts, leftover
    completion marks, free lock files. Never a committed dataset, never what a registered
    version uses."""
    from sae_core.storage.store import Store
    from tasks.housekeeping import collect

    with one_line_errors():
        target = Store(store)
        done = collect(target, dry_run, older_than_hours * 3600)
    verb = "would remove" if dry_run else "removed"
    for item in done.garbage:
        console.print(f"{verb} {item.path} ({item.reason}, {_size(item.size)})", highlight=False)
    for path in done.in_use:
        console.print(f"kept {path}: a run holds its lock", highlight=False)
    freed = sum(item.size for item in done.garbage)
    console.print(
        f"{verb} {len(done.garbage)} folders ({_size(freed)}) and {len(done.locks)} free "
        f"lock files{' (dry run)' if dry_run else ''}",
        highlight=False,
    )


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def _unfinished(kind: str) -> str:
    from sae_core.storage.housekeeping import CHECKPOINTS

    return "(a checkpoint)" if kind == CHECKPOINTS else "[yellow]not committed[/]"


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M")
