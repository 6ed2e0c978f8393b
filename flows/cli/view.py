"""`saeflow view`: an SAE's latents in a local web page, or written as a static site."""

from __future__ import annotations

from typing import Annotated

import typer

from flows.cli.console import console
from flows.cli.errors import one_line_errors
from flows.cli.options import ForceOpt, PresetOpt, ProgressOpt, SetOpt, check_port
from flows.cli.outputs import output_folder

app = typer.Typer()


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
    progress: ProgressOpt = True,
    force: ForceOpt = False,
) -> None:
    """Browse an SAE's latents in a local web page: contexts, histograms, logit lens and
    explanations (computed on first use, then cached; settings: the preset's `latents`)."""
    from sae_core.config import load_config
    from sae_core.latents.viewer import make_server

    with one_line_errors():
        check_port("--port", port, lowest=0)
        site_folder = output_folder(export_dir, "--export", force) if export_dir else None
        cfg = load_config(preset, set_ or [], None)
        from flows.view import prepare

        prepared = prepare(target, cfg.latents, progress)
        figures = {k.removeprefix("explain/"): v for k, v in prepared.metrics.items()}
        console.print(
            f"explainability: mean precision {figures['precision_mean']:.3f}, recall "
            f"{figures['recall_mean']:.3f}, F1 {figures['f1_mean']:.3f} over "
            f"{figures['scored_latents']:.0f} scored latents ({prepared.site.ref.uri})",
            highlight=False,
        )
        if site_folder:
            with one_line_errors(OSError):  # a full disk, a folder it may not write
                files = prepared.site.export(site_folder, progress)
            console.print(
                f"wrote {files} files to {export_dir}; browse them through a web server, e.g. "
                f"python -m http.server --bind 127.0.0.1 -d {export_dir}",
                highlight=False,
            )
            return
        server = make_server(prepared.site, port)
    console.print(f"serving the latent viewer at {server.url} (Ctrl-C to stop)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
