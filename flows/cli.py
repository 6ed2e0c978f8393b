"""The `saeflow` command line."""

from __future__ import annotations

import sys
import time
from contextlib import ExitStack
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from sae_core.config import PipelineConfig, load_config
from sae_core.errors import (
    ConfigError,
    StoreError,
    ValidationFailed,
    storage_errors,
    storage_failure,
)

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train and evaluate sparse autoencoders."
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: scripts that print figures.")
app.add_typer(bench_app, name="bench")
console = Console()

# Errors the user can fix: shown as one line, no traceback.
USER_ERRORS = (ConfigError, StoreError, ValidationFailed)

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


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _load(preset: str, overrides: list[str] | None, store: str | None) -> PipelineConfig:
    try:
        return load_config(preset, overrides or [], store)
    except USER_ERRORS as err:
        _fail(err)
        raise  # unreachable: _fail exits


@app.command()
def config(preset: PresetOpt = "demo", set_: SetOpt = None, store: StoreOpt = None) -> None:
    """Print the resolved configuration as YAML."""
    cfg = _load(preset, set_, store)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
def assets() -> None:
    """Install the demo model and corpus into the asset cache (idempotent)."""
    from sae_core.data.assets import ensure_assets

    ensure_assets(progress=True)


@app.command()
def run(
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    store: StoreOpt = None,
    runner: RunnerOpt = "local",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Run the pipeline: tokens, activations, validation, training, evaluation, registration."""
    cfg = _load(preset, set_, store)
    started = time.perf_counter()
    try:
        from flows.runners import task_runner
        from sae_core.training.preflight import preflight

        shards_on = task_runner(runner)
        preflight(cfg)  # seconds, before Prefect and the model start
        from flows.pipeline import pipeline

        result = pipeline.with_options(task_runner=shards_on)(cfg, progress=progress)
    except USER_ERRORS as err:
        _fail(err)
    except storage_errors() as err:  # a disk or S3 failure that outlasted the task's retries
        _fail(storage_failure(err))
    print_summary(result, time.perf_counter() - started)


GridOpt = Annotated[
    str | None, typer.Option(help="Comma-separated values, e.g. 1152,2304,4608 (default: preset).")
]


@app.command()
def sweep(
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    store: StoreOpt = None,
    n: GridOpt = None,
    k: GridOpt = None,
    seeds: GridOpt = None,
    runner: RunnerOpt = "local",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train and evaluate a grid of SAEs over n x k (x seeds) on one cached activation set, fit
    the scaling law L(n, k) and write the sweep report."""
    grid = {"sweep.n_latents": n, "sweep.k": k, "sweep.seeds": seeds}
    overrides = [*(set_ or []), *(f"{key}=[{value}]" for key, value in grid.items() if value)]
    cfg = _load(preset, overrides, store)
    started = time.perf_counter()
    try:
        from flows.runners import task_runner
        from sae_core.studies.sweep import grid as sweep_grid
        from sae_core.training.preflight import preflight

        shards_on = task_runner(runner)
        sweep_grid(cfg)  # a bad grid point fails in seconds
        preflight(cfg)
        from flows.sweep import sweep as sweep_flow

        result = sweep_flow.with_options(task_runner=shards_on)(cfg, progress=progress)
    except USER_ERRORS as err:
        _fail(err)
    except storage_errors() as err:
        _fail(storage_failure(err))
    print_sweep_summary(result, time.perf_counter() - started)


def print_sweep_summary(result, seconds: float) -> None:  # noqa: ANN001 - SweepResult, imported lazily
    from sae_core.studies.report import SWEEP_COLUMNS
    from sae_core.studies.scaling import PAPER

    # Short headers and states keep the table readable in 80 columns; report.md has it all.
    short = {"dead_fraction": "dead", "ce_loss_recovered": "CE rec", "kl_spliced": "KL",
             "ablation_sparsity": "abl sp", "probe_loss": "probe"}  # fmt: skip
    points = Table(title="sweep (eval split)")
    for name in ("n", "k", "seed", *(short.get(c, c) for c in SWEEP_COLUMNS), "train/eval"):
        points.add_column(name, justify="right")
    for p in result.points:
        label = f"n={p.n} k={p.k} seed={p.seed}"
        values = [f"{p.metrics.get(c, float('nan')):.3g}" for c in SWEEP_COLUMNS]
        states = result.states[label].replace("Completed", "ran").replace("Cached", "cached")
        points.add_row(str(p.n), str(p.k), str(p.seed), *values, states.replace(" ", ""))
    console.print(points)
    if result.fit is not None:
        law = "exp(a + b_k ln k + b_n ln n + g ln k ln n) + exp(z + e ln k)"
        fit = Table(title=f"scaling law L(n, k) = {law}")
        fit.add_column("coefficient")
        fit.add_column("fitted", justify="right")
        fit.add_column("paper (GPT-4)", justify="right")
        for (name, value), paper in zip(result.fit.params.items(), PAPER, strict=True):
            fit.add_row(name, f"{value:.4g}", f"{paper:.4g}")
        console.print(fit)
        loo = result.fit.loo_rel_err
        console.print(
            f"fit error: RMS log error {result.fit.rmse_log:.4f}, max relative error "
            f"{result.fit.max_rel_err:.2%}"
            + ("" if loo is None else f", leave-one-out mean relative error {loo:.2%}")
        )
    console.print(f"report: {result.report.markdown}")
    console.print(f"mlflow run: {result.report.mlflow_run_id}")
    console.print(f"finished in {seconds:.1f} s")


@app.command()
def frontier(
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    store: StoreOpt = None,
    degrees: GridOpt = None,
    seeds: GridOpt = None,
    encoder: Annotated[str | None, typer.Option(help="Expander encoder: tied or untied.")] = None,
    runner: RunnerOpt = "local",
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Trace the storage-fidelity frontier on one cached activation set: the dense TopK SAE,
    an expander SAE per degree and parameter-matched dense SAEs, scored by CE loss recovered."""
    options = {"frontier.degrees": degrees and f"[{degrees}]", "frontier.seeds": seeds and f"[{seeds}]",
               "frontier.encoder": encoder}  # fmt: skip
    overrides = [*(set_ or []), *(f"{key}={value}" for key, value in options.items() if value)]
    cfg = _load(preset, overrides, store)
    started = time.perf_counter()
    try:
        from flows.runners import task_runner
        from sae_core.studies.frontier import frontier_plan
        from sae_core.training.preflight import preflight

        shards_on = task_runner(runner)
        frontier_plan(cfg, preflight(cfg).width)  # a bad degree fails in seconds
        from flows.frontier import frontier as frontier_flow

        result = frontier_flow.with_options(task_runner=shards_on)(cfg, progress=progress)
    except USER_ERRORS as err:
        _fail(err)
    table = Table(title="storage-fidelity frontier (eval split)")
    columns = {"family": "{}", "degree": "{}", "n": "{}", "k": "{}", "seed": "{}",
               "compression": "{:.1f}x", "bytes_ratio": "{:.1f}x", "ce_loss_recovered": "{:.3f}",
               "retained": "{:.1%}", "dead_fraction": "{:.3f}"}  # fmt: skip
    for name in columns:
        table.add_column(name.replace("_", " "), justify="right")
    for row in result.table:
        table.add_row(*(fmt.format(row[name]) for name, fmt in columns.items()))
    console.print(table)
    console.print(f"report: {result.report.markdown}")
    console.print(f"mlflow run: {result.report.mlflow_run_id}")
    console.print(f"finished in {time.perf_counter() - started:.1f} s")


@bench_app.command("train")
def bench_train(
    d: int = 576,
    n: int = 4608,
    k: int = 32,
    batch: int = 4096,
    steps: int = 10,
    device: str = "auto",
    kind: Annotated[str, typer.Option(help="SAE kind: topk or expander.")] = "topk",
    degree: Annotated[
        int | None, typer.Option(help="Expander: non-zeros per decoder direction.")
    ] = None,
    encoder: Annotated[str, typer.Option(help="Expander encoder: untied or tied.")] = "untied",
    dtype: Annotated[
        str, typer.Option(help="The step's GEMM precision (train.dtype): float32 or bfloat16.")
    ] = "float32",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time SAE training steps on synthetic data against one dense GEMM of the same shape."""
    import json

    from sae_core.bench.train_step import bench_train as run_bench

    try:
        result = run_bench(
            d=d,
            n=n,
            k=k,
            batch=batch,
            steps=steps,
            device=device,
            verbose=not json_out,
            kind=kind,  # type: ignore[arg-type]
            degree=degree,
            encoder=encoder,  # type: ignore[arg-type]
            dtype=dtype,
        )
    except USER_ERRORS as err:
        _fail(err)
    if json_out:
        typer.echo(json.dumps(result))


@bench_app.command("extract")
def bench_extract(
    model: Annotated[
        str, typer.Option(help="Demo asset name or HF model folder.")
    ] = "smollm2-135m",
    hook: Annotated[list[str] | None, typer.Option(help="Hook point (repeatable).")] = None,
    tokens: int = 8192,
    context_len: int = 64,
    batch_tokens: int = 2048,
    shard_mb: float = 4.0,
    storage_dtype: str = "float32",
    repeats: int = 3,
    device: str = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Extraction tokens/s against a bare forward of the truncated model and a full forward."""
    import json

    from sae_core.bench.data import bench_extract as run_bench

    try:
        result = run_bench(
            model,
            hook or ["resid_post.15"],
            tokens=tokens,
            context_len=context_len,
            batch_tokens=batch_tokens,
            shard_mb=shard_mb,
            storage_dtype=storage_dtype,
            repeats=repeats,
            device=device,
            verbose=not json_out,
        )
    except USER_ERRORS as err:
        _fail(err)
    if json_out:
        typer.echo(json.dumps(result))


def _bench_stores(stack: ExitStack, s3: bool) -> dict[str, str]:
    """A scratch local store and, with s3, a SeaweedFS started for the run (both undone by
    `stack`): name -> store URI."""
    import os
    import tempfile
    from pathlib import Path

    scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="saeflow-bench-")))
    stores = {"local": str(scratch / "store")}
    if s3:
        from deployments import seaweedfs

        try:
            server = seaweedfs.start(scratch / "seaweedfs", s3_port=18333, port_base=18300)
        except (FileNotFoundError, RuntimeError, TimeoutError) as err:
            _fail(err)
        stack.callback(seaweedfs.stop, server)
        saved = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        os.environ.update(server.env())
        stores["s3"] = "s3://saeflow-bench/load"
    return stores


@bench_app.command("load")
def bench_load(
    s3: Annotated[
        bool, typer.Option("--s3", help="Also on a SeaweedFS started for the run.")
    ] = False,
    rows: int = 2**19,
    width: int = 576,
    dtype: str = "float32",
    batch: int = 4096,
    buffer_tokens: int = 2**16,
    shard_mb: float = 128.0,
    train_steps: int = 30,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Load GB/s and tokens/s (local store, SeaweedFS with --s3) and the trainer's data-wait share."""
    import json

    from sae_core.bench.data import bench_load as run_bench

    with ExitStack() as stack:
        result = run_bench(
            _bench_stores(stack, s3),
            rows=rows,
            width=width,
            dtype=dtype,
            batch=batch,
            buffer_tokens=buffer_tokens,
            shard_mb=shard_mb,
            train_steps=train_steps,
            verbose=not json_out,
        )
    if json_out:
        typer.echo(json.dumps(result))


@bench_app.command("group")
def bench_group(
    n: Annotated[
        list[int] | None, typer.Option(help="Latents of one SAE (repeatable) [1152, 2304, 4608].")
    ] = None,
    k: Annotated[int, typer.Option(help="Active latents of every SAE.")] = 32,
    s3: Annotated[
        bool, typer.Option("--s3", help="Also on a SeaweedFS started for the run.")
    ] = False,
    rows: int = 2**17,
    width: int = 576,
    dtype: str = "float32",
    batch: int = 4096,
    repeats: int = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Wall and CPU time of several SAEs trained one after another against one group reading the data once."""
    import json

    from sae_core.bench.data import bench_group as run_bench

    with ExitStack() as stack:
        result = run_bench(
            _bench_stores(stack, s3),
            [(latents, k) for latents in n or [1152, 2304, 4608]],
            rows=rows,
            width=width,
            dtype=dtype,
            batch=batch,
            repeats=repeats,
            verbose=not json_out,
        )
    if json_out:
        typer.echo(json.dumps(result))


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name, e.g. saeflow-demo.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show the decision; change nothing.")
    ] = False,
    primary: Annotated[
        str | None, typer.Option(help="Metric that must improve [default: ce_loss_recovered].")
    ] = None,
    min_improvement: Annotated[
        float | None, typer.Option(help="Least gain on the primary metric [default: 0.005].")
    ] = None,
    l0_tolerance: Annotated[
        float | None, typer.Option(help="Largest relative L0 difference [default: 0.1].")
    ] = None,
    guard: Annotated[
        list[str] | None,
        typer.Option(
            help="METRIC=SLACK, repeatable; replaces the default guards "
            "(dead_fraction=0.02, nmse=0.01)."
        ),
    ] = None,
) -> None:
    """Move `champion` to the `challenger` version when it beats the champion (the gate)."""
    from rich.markdown import Markdown

    from sae_core.errors import LockTimeout

    try:
        policy = _promotion_policy(primary, min_improvement, l0_tolerance, guard)
        from flows.promote import promote as promote_flow
        from tasks.promote import decision_markdown

        result = promote_flow(name, policy, dry_run)
    except (*USER_ERRORS, LockTimeout) as err:
        _fail(err)
    console.print(Markdown(decision_markdown(result)))


def _promotion_policy(
    primary: str | None,
    min_improvement: float | None,
    l0_tolerance: float | None,
    guards: list[str] | None,
):  # noqa: ANN202 - a PromotionPolicy, imported lazily
    from pydantic import ValidationError

    from sae_core.config import format_validation_error
    from sae_core.evaluation.promotion import PromotionPolicy

    given = {"primary": primary, "min_improvement": min_improvement, "l0_tolerance": l0_tolerance}
    fields = {key: value for key, value in given.items() if value is not None}
    if guards is not None:
        fields["guards"] = {}
        for text in guards:
            metric, sep, slack = text.partition("=")
            try:
                fields["guards"][metric.strip()] = float(slack)
            except ValueError:
                sep = ""
            if not sep:
                raise ConfigError(
                    f"--guard '{text}': expected METRIC=SLACK, e.g. --guard nmse=0.01"
                )
    try:
        return PromotionPolicy(**fields)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err).replace("config error: ", "--")) from None


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="models:/NAME@ALIAS or models:/NAME/VERSION, a saeflow .safetensors file, "
            "or an SAE dataset STORE/sae/FINGERPRINT."
        ),
    ],
    format_: Annotated[str, typer.Option("--format", "-f", help="saelens or sparsify.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Folder to write.")],
    hook: Annotated[
        str | None, typer.Option(help="Hook the SAE reads, e.g. resid_post.15.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Model name to record.")] = None,
) -> None:
    """Write an SAE in SAELens or EleutherAI sparsify format, normalisation included."""
    from pathlib import Path

    from sae_core.sae.export import export_sae, load_source

    try:
        if source.startswith("models:/"):
            from tasks.registry import registered_sae

            sae, origin = registered_sae(source)
        else:
            sae, origin = load_source(source)
        origin = origin.model_copy(
            update={k: v for k, v in {"hook": hook, "model": model}.items() if v}
        )
        files = export_sae(sae, Path(out), format_, origin)  # type: ignore[arg-type]
    except USER_ERRORS as err:
        _fail(err)
    for file in files:
        console.print(f"wrote {file}")
    if format_ == "sparsify" and sae.norm.mode == "per_token":
        console.print(
            "note: sparsify has no input normalisation; centre each token and scale it to unit "
            "norm before encode, undo after decode (cfg.json: saeflow.normalization)"
        )


@app.command(name="import")
def import_(
    folder: Annotated[str, typer.Argument(help="An SAELens or sparsify SAE folder.")],
    out: Annotated[str, typer.Option("--out", "-o", help="saeflow .safetensors file to write.")],
) -> None:
    """Read an SAELens or sparsify TopK SAE into a saeflow safetensors file."""
    from pathlib import Path

    from sae_core.sae.export import detect_format, import_sae

    try:
        fmt = detect_format(Path(folder))
        sae, origin = import_sae(Path(folder))
    except USER_ERRORS as err:
        _fail(err)
    sae.save_safetensors(out)
    console.print(
        f"imported {fmt} SAE: d={sae.d} n={sae.n_latents} k={sae.k} "
        f"normalisation={sae.norm.mode} hook={origin.hook} model={origin.model} -> {out}",
        highlight=False,
    )


@app.command()
def view(
    target: Annotated[
        str,
        typer.Argument(
            help="NAME@ALIAS, models:/NAME@ALIAS, models:/NAME/VERSION, a run id, or an SAE "
            "dataset STORE/sae/FINGERPRINT."
        ),
    ],
    export_dir: Annotated[
        str | None,
        typer.Option("--export", help="Write the viewer as a static site to this folder."),
    ] = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1 (0: any free port).")] = 8000,
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Browse an SAE's latents in a local web page: contexts, histograms, logit lens and
    explanations (computed on first use, then cached; settings: the preset's `latents`)."""
    from pathlib import Path

    from sae_core.latents.viewer import make_server

    cfg = _load(preset, set_, None)
    try:
        from flows.view import prepare

        prepared = prepare(target, cfg.latents, progress)
        figures = {k.removeprefix("explain/"): v for k, v in prepared.metrics.items()}
        console.print(
            f"explainability: mean precision {figures['precision_mean']:.3f}, recall "
            f"{figures['recall_mean']:.3f}, F1 {figures['f1_mean']:.3f} over "
            f"{figures['scored_latents']:.0f} scored latents ({prepared.site.ref.uri})",
            highlight=False,
        )
        if export_dir:
            files = prepared.site.export(Path(export_dir), progress)
            console.print(
                f"wrote {files} files to {export_dir}; browse them through a web server, e.g. "
                f"python -m http.server --bind 127.0.0.1 -d {export_dir}",
                highlight=False,
            )
            return
        server = make_server(prepared.site, port)
    except USER_ERRORS as err:
        _fail(err)
    except storage_errors() as err:
        _fail(storage_failure(err))
    console.print(f"serving the latent viewer at {server.url} (Ctrl-C to stop)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


services_app = typer.Typer(
    no_args_is_help=True,
    help="Local servers the pipeline can use; state in $SAEFLOW_HOME/services.",
)
app.add_typer(services_app, name="services")
ServiceNames = Annotated[
    list[str] | None, typer.Argument(help="Services to act on (default: all).", show_default=False)
]


def _services(names: list[str] | None, s3_port: int | None = None, port_base: int | None = None):
    from deployments.services import select

    ports = {"s3_port": s3_port, "port_base": port_base}
    try:
        return select(names, {"seaweedfs": {k: v for k, v in ports.items() if v is not None}})
    except ValueError as err:
        _fail(err)


def _say(status) -> None:  # noqa: ANN001 - deployments.services.ServiceStatus, imported lazily
    state = "serving" if status.serving else "running, not serving" if status.running else "stopped"
    where = f" at {status.endpoint} (pid {status.pid})" if status.running else ""
    typer.echo(f"{status.name}: {state}{where}; {status.detail}")


@services_app.command("up")
def services_up(
    names: ServiceNames = None,
    s3_port: Annotated[int, typer.Option(help="SeaweedFS S3 port.")] = 8333,
    port_base: Annotated[
        int, typer.Option(help="Shift SeaweedFS's internal ports (0: its defaults).")
    ] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each service.")] = 60.0,
) -> None:
    """Start the services (idempotent), wait until each serves, print the environment to use."""
    from deployments.services import export_lines

    for service in _services(names, s3_port, port_base):
        try:
            _say(service.up(timeout))
        except (FileNotFoundError, RuntimeError, TimeoutError) as err:
            _fail(err)
        typer.echo("\n".join(export_lines(service.env(reveal=False), reveal=False)))
    typer.echo('# or: eval "$(saeflow services env)"')


@services_app.command("down")
def services_down(names: ServiceNames = None) -> None:
    """Stop the services by their recorded pids; their data stays for the next `up`."""
    for service in reversed(_services(names)):  # dependents first: MLflow stores on SeaweedFS
        _say(service.down())


@services_app.command("status")
def services_status(
    names: ServiceNames = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Whether each service runs and serves, where, and where its state lives."""
    import dataclasses
    import json

    statuses = [service.status() for service in _services(names)]
    if json_out:
        typer.echo(json.dumps({s.name: dataclasses.asdict(s) for s in statuses}))
    for status in statuses if not json_out else []:
        _say(status)


@services_app.command("env")
def services_env(names: ServiceNames = None) -> None:
    """Print `export` lines, secrets included, for `eval "$(saeflow services env)"`."""
    from deployments.services import export_lines

    for service in _services(names):
        typer.echo("\n".join(export_lines(service.env(reveal=True), reveal=True)))


def print_summary(result, seconds: float) -> None:  # noqa: ANN001 - PipelineResult, imported lazily
    stages = Table(title="stages")
    stages.add_column("stage")
    stages.add_column("state")
    for name, state in result.stages.items():
        stages.add_row(name, state)
    metrics = Table(title="evaluation (eval split)")
    metrics.add_column("metric")
    metrics.add_column("value", justify="right")
    for name, value in sorted({**result.evaluation.metrics, **result.latents.metrics}.items()):
        metrics.add_row(name, f"{value:.4g}")
    where = Table(title="outputs")
    where.add_column("what")
    where.add_column("where")
    where.add_row("tokens", result.tokens.uri)
    where.add_row("activations", result.activations.uri)
    where.add_row("sae", result.sae.uri)
    where.add_row("evaluation", result.evaluation.dataset.uri)
    where.add_row("latents (saeflow view)", result.latents.dataset.uri)
    reg = result.registry
    where.add_row("model", f"{reg.name} version {reg.version} @{reg.alias}")
    where.add_row("mlflow", f"{reg.tracking_uri} run {reg.run_id}")
    for table in (stages, metrics, where):
        console.print(table)
    console.print(f"finished in {seconds:.1f} s")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
