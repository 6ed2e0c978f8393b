"""`saeflow bench ...`: one command per benchmark (sae_core/bench/), its flags built from the
benchmark's options class, so a flag, its default and its help are declared once, there."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from flows.cli.errors import one_line_errors
from flows.cli.options import JsonOpt, flag, flag_error, flags_of, register, typed_options
from sae_core.bench.options import (
    BenchOptions,
    CliBench,
    ExtractBench,
    GroupBench,
    HashBench,
    LoadBench,
    TrainBench,
)

app = typer.Typer(no_args_is_help=True, help="Benchmarks: scripts that print figures.")

S3Opt = Annotated[bool, typer.Option("--s3", help="Also on a SeaweedFS started for the run.")]

# A benchmark's command body: (its options, verbose, the command's own flags) -> the figures.
Bench = Callable[..., dict[str, Any]]


def bench_command(name: str, options: type[BenchOptions]) -> Callable[[Bench], Bench]:
    """Registers `run(options, verbose, **flags)` as `saeflow bench NAME`: a flag per field of
    `options`, then `run`'s own flags (those after the first two), then --json (the figures
    as one JSON object instead of the printed table); `run`'s docstring is the help."""

    def register_bench(run: Bench) -> Bench:
        def command(json_out: bool, **flags: Any) -> None:
            fields = {field: flags.pop(field) for field in options.model_fields}
            with one_line_errors():
                try:
                    chosen = options(**fields)
                except ValidationError as err:
                    raise flag_error(err) from None
                figures = run(chosen, not json_out, **flags)
            if json_out:
                typer.echo(json.dumps(figures))

        flags = [*typed_options(options), *flags_of(run, skip=2), flag("json_out", JsonOpt, False)]
        register(app, name, command, flags, help_from=run)
        return run

    return register_bench


@bench_command("train", TrainBench)
def train(options: TrainBench, verbose: bool) -> dict[str, Any]:
    """Time SAE training steps on synthetic data against one dense GEMM of the same shape."""
    from sae_core.bench.train_step import bench_train

    return bench_train(options, verbose=verbose)


@bench_command("extract", ExtractBench)
def extract(options: ExtractBench, verbose: bool) -> dict[str, Any]:
    """Extraction tokens/s against a bare forward of the truncated model and a full forward."""
    from sae_core.bench.extract import bench_extract

    return bench_extract(options, verbose=verbose)


@bench_command("load", LoadBench)
def load(options: LoadBench, verbose: bool, s3: S3Opt = False) -> dict[str, Any]:
    """Load GB/s and tokens/s (local store, SeaweedFS with --s3) and the trainer's data-wait share."""
    from sae_core.bench.load import bench_load

    with ExitStack() as stack:
        return bench_load(options, _scratch_stores(stack, s3), verbose=verbose)


@bench_command("group", GroupBench)
def group(options: GroupBench, verbose: bool, s3: S3Opt = False) -> dict[str, Any]:
    """Wall and CPU time of several SAEs trained one after another against one group reading the data once."""
    from sae_core.bench.group import bench_group

    with ExitStack() as stack:
        return bench_group(options, _scratch_stores(stack, s3), verbose=verbose)


@bench_command("cli", CliBench)
def cli(options: CliBench, verbose: bool) -> dict[str, Any]:
    """Start-up seconds of `saeflow --help` and `saeflow config`, each a fresh process."""
    from sae_core.bench.startup import bench_cli

    return bench_cli(options, verbose=verbose)


@bench_command("hash", HashBench)
def hash_(options: HashBench, verbose: bool) -> dict[str, Any]:
    """Seconds to fingerprint a model by content: the first time, and again with the digests remembered."""
    from sae_core.bench.hashing import bench_hash

    return bench_hash(options, verbose=verbose)


def _scratch_stores(stack: ExitStack, s3: bool) -> dict[str, str]:
    """A scratch local store and, with s3, a SeaweedFS started for the run (both undone by
    `stack`): name -> store URI."""
    import os
    import tempfile
    from pathlib import Path

    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="saeflow-bench-")))
    stores = {"local": str(scratch / "store")}
    if s3:
        from deployments import seaweedfs

        # A missing binary, a server that exits or never answers.
        with one_line_errors(FileNotFoundError, RuntimeError, TimeoutError):
            server = seaweedfs.start(
                scratch / "seaweedfs", s3_port=18333, port_base=18300, bucket="saeflow-bench"
            )
        stack.callback(seaweedfs.stop, server)
        saved = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        os.environ.update(server.env())
        stores["s3"] = "s3://saeflow-bench/load"
    return stores
