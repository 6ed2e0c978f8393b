"""`saeflow study ...`: measurements on a preset's activations, outside the pipeline's flows,
and `kinds`: the SAE kinds compared, each through the pipeline's flow.

The activations come through the pipeline's stages on the preset's store (sampled and
extracted when missing, shared with `saeflow run`); the studies themselves live in
sae_core/studies/ (`recipes`, `precision`, `kinds`).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.console import bars_above_logs, console
from flows.cli.errors import one_line_errors
from flows.cli.options import ForceOpt, PresetOpt, ProgressOpt, SetOpt, StoreOpt
from flows.cli.outputs import output_folder
from sae_core.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Studies: measurements that write their figures.")


def activations_of(config: Any, model: Any = None) -> Any:
    """The preset's activations (with `model` in place of config.model), through the stages."""
    from sae_core.stages.extract import extract_activations
    from sae_core.stages.sample import sample_tokens
    from sae_core.storage.store import default_store_uri

    model = model or config.model
    store = config.store or default_store_uri()
    return extract_activations(sample_tokens(store, model, config.data), model, config.data)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated integers") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: give positive integers")
    return values


@app.command()
def recipes(
    out: Annotated[Path, typer.Option("--out", help="The points (JSON), kept across re-runs.")],
    budgets: Annotated[
        str, typer.Option("--budgets", help="Training tokens, comma-separated.")
    ] = "131072,262144",
    recipes: Annotated[
        str, typer.Option("--recipes", help="Recipes, comma-separated: paper, budget.")
    ] = "paper,budget",
    sparsify_python: Annotated[
        str | None,
        typer.Option("--sparsify-python", help="A Python with eai-sparsify: train it too."),
    ] = None,
    ce_contexts: Annotated[
        int, typer.Option("--ce-contexts", help="Eval contexts scored for CE loss recovered.")
    ] = 128,
    activations: Annotated[
        str | None,
        typer.Option(
            "--activations",
            help="A committed activations dataset (STORE/activations/FP) to study instead of "
            "the preset's (its model scores CE); the preset still gives the SAE and training.",
        ),
    ] = None,
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    store: StoreOpt = None,
) -> None:
    """Quality per token: the preset's SAE trained under each recipe at each budget (and by
    EleutherAI sparsify), scored on the held-out split (sae_core/studies/recipes.py)."""
    with one_line_errors():
        from sae_core.config import load_config

        config = load_config(preset, set_ or [], store)
        chosen = recipes.split(",")
        if not set(chosen) <= {"paper", "budget"}:
            raise ConfigError(f"--recipes {recipes!r}: choose from paper, budget")
        if sparsify_python and not Path(sparsify_python).is_file():
            raise ConfigError(f"--sparsify-python {sparsify_python}: no such file")
        todo = _ints(budgets, "--budgets")
        if not out.parent.is_dir():
            raise ConfigError(f"--out {out}: its folder does not exist")
        if out.exists() and not out.is_file():
            raise ConfigError(f"--out {out}: not a regular file; give a .json file's path")
        from sae_core.data.assets import resolve_model_path
        from sae_core.data.models import load_model
        from sae_core.storage.manifests import ActivationsManifest
        from sae_core.storage.refs import committed_dataset
        from sae_core.studies.recipes import recipe_study

        if activations is None:
            acts, model_path = activations_of(config), config.model.path
        else:
            acts = committed_dataset(activations, "activations")
            if acts is None:
                raise ConfigError(
                    f"--activations {activations}: not a committed activations dataset"
                )
            model_path = acts.manifest(ActivationsManifest).model or config.model.path
        model = load_model(resolve_model_path(model_path), "float32", "cpu").model
        points = recipe_study(
            acts, model, config.sae, config.train, todo, chosen, out, sparsify_python, ce_contexts
        )
        from sae_core.studies.plots import recipe_frontier

        out.with_suffix(".png").write_bytes(recipe_frontier(points))
    for p in points:
        console.print(
            f"{p.trainer:>8} {p.budget:>9} tokens  {p.steps:>5} steps  fvu {p.fvu:.4f}  "
            f"nmse {p.nmse:.4f}  CE recovered {p.ce_loss_recovered:.4f}",
            highlight=False,
        )
    console.print(f"points: {out}; plot: {out.with_suffix('.png')}", highlight=False)


@app.command()
def precision(
    dtype: Annotated[
        str, typer.Option("--dtype", help="The model dtype compared with float32.")
    ] = "bfloat16",
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    store: StoreOpt = None,
) -> None:
    """The preset's activations extracted in `--dtype` against float32: their relative error
    on the eval split (sae_core/studies/precision.py). Prints one JSON object."""
    with one_line_errors():
        from sae_core.config import load_config
        from sae_core.studies.precision import activation_error

        if dtype != "bfloat16":
            raise ConfigError(f"--dtype {dtype!r}: the model dtypes are float32 and bfloat16")
        config = load_config(preset, set_ or [], store)
        refs = [
            activations_of(config, config.model.model_copy(update={"dtype": d}))
            for d in ("float32", dtype)
        ]
        error = activation_error(*refs)
    typer.echo(json.dumps(error._asdict()))


KindsOpt = Annotated[
    str,
    typer.Option(
        "--kinds", help="Kinds, comma-separated: topk, batch_topk, matryoshka, skip_transcoder."
    ),
]
KindSetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--kind-set",
        help="KIND:key.path=value: an override for one kind, after the kind's own (repeatable), "
        "e.g. skip_transcoder:train.tokens=1048576.",
    ),
]


@app.command()
def kinds(
    out: Annotated[
        str, typer.Option("--out", help="The report's folder: report.md, table.json, kinds.png.")
    ],
    kinds: KindsOpt = "topk,batch_topk,matryoshka,skip_transcoder",
    kind_set: KindSetOpt = None,
    force: ForceOpt = False,
    preset: PresetOpt = "demo",
    set_: SetOpt = None,
    store: StoreOpt = None,
    progress: ProgressOpt = True,
) -> None:
    """SAE kinds compared on the preset's data: each kind through the pipeline (`saeflow run`:
    cached, resumable, registered) with the preset, the --sets, the kind's own overrides and its
    --kind-sets; then one report of NMSE, CE loss recovered, absorption, k=1 sparse probing,
    dead latents and wall times (sae_core/studies/kinds.py)."""
    from deployments.access import check_access
    from flows.stopping import stop_on_signals
    from sae_core import stopping

    stopping.reset()
    with one_line_errors(), stop_on_signals():
        from sae_core.studies.kinds import earlier_rows, plan_kinds
        from sae_core.training.preflight import preflight

        plans = plan_kinds(preset, set_ or [], kinds, kind_set or [], store)
        folder = output_folder(out, "--out", force)
        earlier = earlier_rows(folder) if folder.is_dir() else {}
        for plan in plans:  # every kind's bad input fails in seconds, before the first trains
            preflight(plan.config)
        check_access()
        words = ["saeflow", "study", "kinds", "--preset", preset, "--kinds", kinds]
        words += [w for o in set_ or [] for w in ("--set", o)]
        words += [w for o in kind_set or [] for w in ("--kind-set", o)]
        words += [*(["--store", store] if store else []), "--out", out]
        rows = _run_kinds(plans, earlier, progress)
        from sae_core.studies.kinds import kinds_table, write_kinds_report

        report = write_kinds_report(rows, plans, preset, shlex.join(words), folder)
    console.print(kinds_table(rows), highlight=False, soft_wrap=True)
    console.print(f"report: {report}", highlight=False, soft_wrap=True)


def _run_kinds(plans: list[Any], earlier: dict[str, Any], progress: bool) -> list[Any]:
    """Each plan's pipeline run, in order, read into its KindRow."""
    from flows.cli.pipeline import run_flow
    from flows.pipeline import pipeline
    from flows.runners import task_runner
    from flows.stopping import quiet_console_after_stop
    from sae_core.studies.kinds import kind_row
    from tasks.caching import COMPUTED

    quiet_console_after_stop()
    rows = []
    with bars_above_logs():
        for i, plan in enumerate(plans, 1):
            console.print(f"kind {i}/{len(plans)}: {plan.kind}", highlight=False)
            result = run_flow(pipeline, plan.config, task_runner("local"), progress)
            # A training this run did (from the start, or resumed: the pipeline's outcome says).
            outcome = result.stages["train_sae"]
            trained = outcome == COMPUTED or outcome.startswith("resumed")
            bench = result.saebench.dataset if result.saebench else None
            rows.append(
                kind_row(
                    plan,
                    result.sae,
                    result.evaluation.dataset,
                    bench,
                    result.seconds["train_sae"] if trained else None,
                    earlier,
                )
            )
    return rows
