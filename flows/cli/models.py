"""`saeflow promote | export | import`: the registry's champion gate, and SAEs to and from the
SAELens and EleutherAI sparsify formats."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli.console import console
from flows.cli.errors import one_line_errors
from flows.cli.options import ForceOpt, flag_error
from flows.cli.outputs import output_file, output_folder
from sae_core.errors import ConfigError

if TYPE_CHECKING:
    from sae_core.evaluation.promotion import PromotionPolicy

app = typer.Typer()

# `saeflow promote`'s exit code when the gate keeps the champion (dry run or not): automation
# tells a rejection from a promotion (0) and from bad input (2).
EXIT_REJECTED = 3


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
    """Move `champion` to the `challenger` version when it beats the champion (the gate).

    Exit code: 0 promoted (or would be, with --dry-run; or already champion), 3 the gate
    rejected the challenger, 2 bad input."""
    from rich.markdown import Markdown

    from deployments.access import check_access

    with one_line_errors():
        policy = _promotion_policy(primary, min_improvement, l0_tolerance, guard)
        check_access()
        _check_promotable(name)
        from flows.promote import promote as promote_flow
        from tasks.promote import decision_markdown

        result = promote_flow(name, policy, dry_run)
    console.print(Markdown(decision_markdown(result)))
    if result.rejected:
        raise typer.Exit(EXIT_REJECTED)


def _check_promotable(name: str) -> None:
    """A registered model name, with a challenger: refused before the flow starts Prefect
    (whose retries of a registry error took half a minute), the cheap checks first."""
    from pydantic import ValidationError

    from sae_core.config import RegistryConfig
    from tasks.tracking import tracking_uri

    try:
        RegistryConfig(model_name=name)
    except ValidationError:
        raise ConfigError(
            f"model name {name!r}: not a registered model's name (letters, digits and _.-, "
            "at most 100); give e.g. saeflow-demo"
        ) from None
    database = tracking_uri().removeprefix("sqlite:///")
    if database != tracking_uri() and not Path(database).exists():  # checked, not created
        raise ConfigError(
            f"model '{name}': nothing is registered yet ({database} does not exist); register "
            "one first (saeflow run) or set MLFLOW_TRACKING_URI to your registry"
        )
    from sae_core.evaluation.promotion import challenger_version
    from tasks.registry import MlflowRegistry

    challenger_version(MlflowRegistry(), name)


def _promotion_policy(
    primary: str | None,
    min_improvement: float | None,
    l0_tolerance: float | None,
    guards: list[str] | None,
) -> PromotionPolicy:
    from pydantic import ValidationError

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
        raise flag_error(err) from None


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
    model: Annotated[
        str | None, typer.Option(help="Model id to record (default: the hub id of the one it ran).")
    ] = None,
    force: ForceOpt = False,
) -> None:
    """Write an SAE in SAELens or EleutherAI sparsify format, normalisation included."""
    from sae_core.data.assets import hub_model_id
    from sae_core.sae.export import check_format, export_sae, load_source

    with one_line_errors():
        check_format(format_)
        folder = output_folder(out, "--out", force)
        if source.startswith("models:/"):
            from tasks.registry import registered_sae

            sae, origin = registered_sae(source)
        else:
            sae, origin = load_source(source)
        # Other tools name a model by its hub id, never by a folder on this machine.
        origin = origin.model_copy(
            update={"hook": hook or origin.hook, "model": model or hub_model_id(origin.model)}
        )
    with one_line_errors(OSError):  # a full disk, a folder it may not write
        files = export_sae(sae, folder, format_, origin)  # type: ignore[arg-type]
    for file in files:
        console.print(f"wrote {file}")
    if origin.model is None:
        console.print("note: no hub id known for the model; pass --model HUB_ID to record one")
    if format_ == "sparsify" and sae.norm.mode == "per_token":
        console.print(
            "note: sparsify has no input normalisation; centre each token and scale it to unit "
            "norm before encode, undo after decode (cfg.json: saeflow.caller_transform; README: "
            "Export)"
        )


@app.command(name="import")
def import_(
    folder: Annotated[str, typer.Argument(help="An SAELens or sparsify SAE folder.")],
    out: Annotated[str, typer.Option("--out", "-o", help="saeflow .safetensors file to write.")],
    force: ForceOpt = False,
) -> None:
    """Read an SAELens or sparsify TopK SAE into a saeflow safetensors file."""
    from sae_core.sae.importer import detect_format, import_sae

    with one_line_errors():
        target = output_file(out, "--out", force)
        fmt = detect_format(Path(folder))
        sae, origin = import_sae(Path(folder))
    with one_line_errors(OSError):
        sae.save_safetensors(target)
    console.print(
        f"imported {fmt} SAE: d={sae.d} n={sae.n_latents} k={sae.k} "
        f"normalisation={sae.norm.mode} hook={origin.hook} model={origin.model} -> {out}",
        highlight=False,
    )
