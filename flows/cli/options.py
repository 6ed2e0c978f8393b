"""Options several commands share, and the pieces commands are assembled from: flags declared
once (a typed options class, a function's parameters) and placed in a command's signature."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sae_core.errors import ConfigError

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="Preset name or YAML path.")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override: key.path=value (repeatable).")
]
StoreOpt = Annotated[
    str | None, typer.Option("--store", help="Store URI: a directory or s3://bucket/prefix.")
]
RunnerOpt = Annotated[
    str,
    typer.Option(
        "--runner",
        help="Where extraction shards run: local (this process) or dask://HOST:PORT (the "
        "workers of a running Dask scheduler; needs PREFECT_API_URL).",
    ),
]
ProgressOpt = Annotated[bool, typer.Option(help="Show progress bars.")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace an existing output file, or the files of a folder.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def flag(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    """A command parameter `name` (a Typer Annotated type) with its default."""
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def flags_of(fn: Callable[..., Any], skip: int = 0) -> list[inspect.Parameter]:
    """`fn`'s parameters after its first `skip`, as they are declared there."""
    parameters = list(inspect.signature(fn, eval_str=True).parameters.values())[skip:]
    return [flag(p.name, p.annotation, p.default) for p in parameters]


def typed_options(options: type[BaseModel]) -> list[inspect.Parameter]:
    """A flag per field of `options`: `--field-name`, the field's type and default, its
    description as the help."""
    return [
        flag(name, Annotated[field.annotation, typer.Option(help=field.description)], field.default)
        for name, field in options.model_fields.items()
    ]


def register(
    app: typer.Typer,
    name: str,
    command: Callable[..., None],
    flags: list[inspect.Parameter],
    help_from: Callable[..., Any],
) -> None:
    """`command(**flags)` as `NAME` of `app`, its help the docstring of `help_from`."""
    command.__signature__ = inspect.Signature(flags)  # type: ignore[attr-defined]
    command.__doc__ = help_from.__doc__
    app.command(name)(command)


def check_port(flag: str, port: int, lowest: int = 1, highest: int = 65535) -> None:
    """ConfigError naming `flag` unless `port` is in lowest..highest (TCP ports end at 65535)."""
    if not lowest <= port <= highest:
        free = " (0: any free port)" if lowest == 0 else ""
        raise ConfigError(f"{flag} {port}: choose a port in {lowest}-{highest}{free}")


def flag_error(err: ValidationError) -> ConfigError:
    """A typed options class's validation error, naming the flags: `--name: why`."""
    from sae_core.config import format_validation_error

    return ConfigError(format_validation_error(err).replace("config error: ", "--"))
