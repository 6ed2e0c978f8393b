"""SAE kinds compared on one preset's data (`saeflow study kinds`): TopK, BatchTopK, Matryoshka
BatchTopK and a skip transcoder, each through the whole pipeline, side by side at their measured
L0 and training tokens: NMSE, CE loss recovered, absorption, k=1 sparse probing, dead latents and
wall times.

`plan_kinds` makes each kind's configuration (the preset, the user's overrides, the kind's
(`sae_core.config.STUDY_KINDS`), then the user's for that kind); `kind_row` reads a finished
run's datasets into a `KindRow`; `write_kinds_report` writes report.md, table.json and kinds.png.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from sae_core.config import PipelineConfig, load_config, study_kind_overrides
from sae_core.errors import ConfigError
from sae_core.storage.manifests import EvaluationManifest, SaeBenchManifest, SaeManifest
from sae_core.storage.refs import DatasetRef
from sae_core.studies import plots
from sae_core.studies.report import REPORT_FILE, _md_table

TABLE_FILE = "table.json"
FIGURE_FILE = "kinds.png"


class KindPlan(NamedTuple):
    """One kind of the study, ready to run."""

    kind: str
    """The kind's name (sae_core.config.STUDY_KINDS)."""
    overrides: list[str]
    """The `--set` overrides on top of the preset that make its configuration, in order."""
    config: PipelineConfig
    """The configuration its pipeline runs."""
    saebench_off: str | None
    """Why SAEBench's stage does not run for it; None when it runs."""


class KindRow(NamedTuple):
    """One kind's figures: a row of report.md and of table.json."""

    kind: str
    """The kind's name (sae_core.config.STUDY_KINDS)."""
    n: int
    """Latents."""
    k: int
    """Active latents per token asked for (BatchTopK and Matryoshka: on average)."""
    l0: float
    """Active latents per token, measured on the eval split."""
    tokens: int
    """Training tokens seen."""
    steps: int
    """Optimiser steps."""
    seed: int
    """train.seed: the SAE's initialisation and the batches' order."""
    recipe: str | None
    """The training recipe (train.recipe) the SAE's manifest records."""
    nmse: float
    """Normalised MSE on the eval split of `nmse_target`'s activation."""
    nmse_target: str
    """The hook nmse scores: model.hook for an SAE, model.hook_out (its y) for a transcoder."""
    transcoder: bool
    """Reads model.hook and reconstructs model.hook_out."""
    ce_loss_recovered: float
    """CE loss recovered against zero ablation, the reconstruction spliced in (eval split)."""
    absorption: float | None
    """SAEBench's mean absorption fraction over the scored letters (lower is better); None:
    not measured (`absorption_note` says why)."""
    absorption_note: str
    """Why absorption is None; empty when it was measured."""
    sparse_probe_k1: float | None
    """SAEBench's k=1 sparse probe: balanced accuracy of the best single latent, mean over the
    genre and part-of-speech tasks; None: not measured (`probing_note` says why)."""
    probing_note: str
    """Why sparse_probe_k1 is None; empty when it was measured."""
    dead_fraction: float
    """Latents that never fired on the eval split."""
    dead_fraction_train: float
    """Latents silent for sae.dead_window_tokens at the end of training."""
    train_seconds: float | None
    """Training's wall time; None: not measured (`train_timing` says why)."""
    train_timing: str
    """Where train_seconds comes from: this run, an earlier run of this study, or why not."""
    eval_seconds: float
    """The evaluation stage's wall time, as its manifest records it."""
    saebench_seconds: float | None
    """SAEBench's stage's wall time, as its manifest records it; None: it did not run."""
    device: str | None
    """The device training ran on (the SAE's manifest)."""
    sae: str
    """The SAE's URI on the store."""


def plan_kinds(
    preset: str, sets: Sequence[str], kinds: str, kind_sets: Sequence[str], store: str | None
) -> list[KindPlan]:
    """Each kind of the comma-separated `kinds`, configured and validated; `kind_sets`:
    `KIND:key.path=value` overrides applied after that kind's own."""
    names = kinds.split(",")
    if len(set(names)) != len(names):
        raise ConfigError(f"--kinds {kinds!r}: name each kind once")
    extra: dict[str, list[str]] = {}
    for text in kind_sets:
        name, sep, override = text.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--kind-set {text!r}: give KIND:key.path=value")
        if name not in names:
            raise ConfigError(f"--kind-set {text!r}: {name!r} is not among --kinds {kinds!r}")
        extra.setdefault(name, []).append(override)
    hook = load_config(preset, sets, store).model.hook
    plans = []
    for name in names:
        overrides = [*sets, *study_kind_overrides(name, hook), *extra.get(name, [])]
        config = load_config(preset, overrides, store)
        off = None if config.saebench.enabled else "saebench.enabled=false"
        plans.append(KindPlan(name, overrides, config, off))
    return plans


def _absorption(
    plan: KindPlan, bench: dict[str, float] | None, skipped: dict[str, str]
) -> tuple[float | None, str]:
    cfg = plan.config.saebench
    if bench is None:
        return None, str(plan.saebench_off)
    if "absorption_fraction" in bench:
        return bench["absorption_fraction"], ""
    if "absorption" in skipped:
        return None, skipped["absorption"]
    if not cfg.absorption_words:
        return None, "saebench.absorption_words=0"
    return None, (
        f"{bench.get('absorption_letters', 0):.0f} letters passed the probe F1 gate, fewer than "
        f"saebench.min_letters={cfg.min_letters}"
    )


def _probing(plan: KindPlan, bench: dict[str, float] | None) -> tuple[float | None, str]:
    config = plan.config
    if bench is None:
        return None, str(plan.saebench_off)
    if "sparse_probe_acc_k1" in bench:
        return bench["sparse_probe_acc_k1"], ""
    if 1 not in config.saebench.sparse_probe_ks:
        return None, "1 is not in saebench.sparse_probe_ks"
    if not config.eval.probe_contexts:
        return None, "eval.probe_contexts=0"
    return None, "no k=1 figure: the probe corpus has no labels (set eval.probe_corpus)"


def kind_row(
    plan: KindPlan,
    sae: DatasetRef,
    evaluation: DatasetRef,
    saebench: DatasetRef | None,
    trained_seconds: float | None,
    earlier: dict[str, KindRow],
) -> KindRow:
    """The figures of `plan`'s finished run, from its datasets' manifests.

    trained_seconds: training's wall time when this run trained the SAE, None when it found it
    trained; earlier: an earlier report's rows by SAE URI (their training times)."""
    sae_m = sae.manifest(SaeManifest)
    eval_m = evaluation.manifest(EvaluationManifest)
    bench_m = None if saebench is None else saebench.manifest(SaeBenchManifest)
    bench = None if bench_m is None else bench_m.metrics
    before = earlier.get(sae.uri)
    if trained_seconds is not None:
        resumed = sae_m.resumed_from_tokens
        timing = "this run" + (f", resumed from {resumed:,} tokens" if resumed else "")
    elif before is not None and before.train_seconds is not None:
        trained_seconds, timing = before.train_seconds, "an earlier run of this study"
    else:
        timing = "not measured: trained before this study ran"
    model, metrics = plan.config.model, eval_m.metrics
    skipped = {} if bench_m is None else bench_m.skipped
    absorption, absorption_note = _absorption(plan, bench, skipped)
    probing, probing_note = _probing(plan, bench)
    return KindRow(
        kind=plan.kind,
        n=sae_m.n,
        k=sae_m.k,
        l0=metrics["l0"],
        tokens=sae_m.tokens_seen,
        steps=sae_m.steps,
        seed=plan.config.train.seed,
        recipe=sae_m.recipe,
        nmse=metrics["nmse"],
        nmse_target=model.hook_out or model.hook,
        transcoder=model.hook_out is not None,
        ce_loss_recovered=metrics["ce_loss_recovered"],
        absorption=absorption,
        absorption_note=absorption_note,
        sparse_probe_k1=probing,
        probing_note=probing_note,
        dead_fraction=metrics["dead_fraction"],
        dead_fraction_train=sae_m.dead_fraction,
        train_seconds=trained_seconds,
        train_timing=timing,
        eval_seconds=eval_m.seconds["total"],
        saebench_seconds=None if bench_m is None else bench_m.seconds["total"],
        device=sae_m.device,
        sae=sae.uri,
    )


def earlier_rows(folder: Path) -> dict[str, KindRow]:
    """The rows of the report already in `folder` (none: {}), by SAE URI: a rerun keeps the
    training times of the SAEs it finds trained."""
    table = folder / TABLE_FILE
    if not table.is_file():
        return {}
    try:
        rows = [KindRow(**row) for row in json.loads(table.read_text())]
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"--out {folder}: {TABLE_FILE} is not a kinds study's table ({err}); remove it or "
            "choose another --out"
        ) from None
    return {row.sae: row for row in rows}


def _value(value: float | None, note: str) -> str:
    return f"n/a: {note}" if value is None else f"{value:.4g}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def kinds_table(rows: Sequence[KindRow]) -> str:
    """report.md's comparison: a markdown table, one row per kind."""
    shown = [
        {
            "kind": r.kind,
            "n": r.n,
            "k": r.k,
            "L0 (eval)": f"{r.l0:.4g}",
            "tokens": f"{r.tokens:,}",
            "steps": f"{r.steps:,}",
            "seed": r.seed,
            "recipe": r.recipe or "n/a",
            "NMSE": f"{r.nmse:.4g}" + (f" (y: {r.nmse_target})" if r.transcoder else ""),
            "CE loss recovered": f"{r.ce_loss_recovered:.4g}",
            "absorption": _value(r.absorption, r.absorption_note),
            "sparse probing, k=1": _value(r.sparse_probe_k1, r.probing_note),
            "dead (eval)": f"{r.dead_fraction:.4g}",
            "dead (train window)": f"{r.dead_fraction_train:.4g}",
            "train s": _seconds(r.train_seconds),
            "eval s": _seconds(r.eval_seconds),
            "SAEBench s": _seconds(r.saebench_seconds),
        }
        for r in rows
    ]
    return _md_table(shown)


# Here rather than in plots.py, whose source is part of the stored reports' addresses.
def kinds_figure(rows: Sequence[KindRow]) -> bytes:
    """A panel of bars per figure, a bar per kind: CE loss recovered, NMSE (a transcoder's of y,
    hatched), absorption and k=1 sparse probing ("n/a" where not measured)."""
    panels = (
        ("ce_loss_recovered", "CE loss recovered (higher: better)"),
        ("nmse", "NMSE (lower: better; hatched: of y)"),
        ("absorption", "absorption fraction (lower: better)"),
        ("sparse_probe_k1", "sparse probing, k=1 (higher: better)"),
    )
    fig, axes = plots._figure(ncols=len(panels), width=3.4, height=3.6)
    x = list(range(len(rows)))
    colors = plots._colors(x)
    for ax, (field, title) in zip(axes, panels, strict=True):
        # NaN: CE loss recovered where ablating the hook does not hurt the model.
        values = [
            v if v is not None and math.isfinite(v) else None
            for v in (getattr(r, field) for r in rows)
        ]
        heights = [v or 0.0 for v in values]
        bars = ax.bar(x, heights, color=[colors[i] for i in x])
        # From 0 (or below, a negative CE recovered), room above for the labels; all n/a: 0-1.
        ax.set_ylim(min(0.0, *heights), 1.12 * max(0.0, *heights) or 1.0)
        for i, (bar, value) in enumerate(zip(bars, values, strict=True)):
            label = "n/a" if value is None else f"{value:.3g}"
            ax.text(i, value or 0.0, label, ha="center", va="bottom", fontsize=8)
            if field == "nmse" and rows[i].transcoder:
                bar.set_hatch("//")
        ax.set_xticks(x, [r.kind for r in rows], rotation=25, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    return plots._png(fig)


def kinds_report(
    rows: Sequence[KindRow], plans: Sequence[KindPlan], preset: str, command: str
) -> str:
    """report.md: the table, what its columns mean, the figure, the commands and the SAEs;
    `preset` and `command`: the study's, shown with each kind's own `saeflow run`."""
    config = plans[0].config
    store = f" --store {shlex.quote(config.store)}" if config.store else ""
    runs = [
        f"saeflow run --preset {shlex.quote(preset)}{store} "
        + " ".join(f"--set {shlex.quote(o)}" for o in plan.overrides)
        for plan in plans
    ]
    return "\n".join(
        [
            f"# {config.name}: SAE kinds on {config.model.path}\n",
            "Each kind through the whole pipeline (`saeflow run`: trained, evaluated, scored by "
            "SAEBench where it runs) on the preset's data, at its own measured L0 and training "
            "tokens.\n",
            "## Comparison (eval split)\n",
            kinds_table(rows),
            "- NMSE: of the SAE's input; a transcoder's is of its target y (the output hook), "
            "which it predicts from another hook's activation.\n"
            "- absorption: SAEBench's mean absorption fraction on the first-letter task "
            "(lower: better); sparse probing, k=1: balanced accuracy of the best single latent, "
            "mean over the genre and part-of-speech tasks.\n"
            "- dead (eval): never fired on the eval split; dead (train window): silent for "
            "sae.dead_window_tokens at the end of training.\n"
            "- train s: as the run that trained the SAE measured it ("
            + "; ".join(f"{r.kind}: {r.train_timing}, on {r.device}" for r in rows)
            + "); eval s and SAEBench s: as the stages' manifests record them (the first SAE on "
            "an eval set also pays its baseline and probe set).\n",
            f"![SAE kinds compared]({FIGURE_FILE})\n",
            "## Commands\n",
            f"This report: `{command}`. Each kind alone, the same run:\n",
            "```bash\n" + "\n".join(runs) + "\n```\n",
            "## SAEs\n",
            "\n".join(f"- {r.kind}: `{r.sae}`" for r in rows) + "\n",
        ]
    )


def write_kinds_report(
    rows: Sequence[KindRow], plans: Sequence[KindPlan], preset: str, command: str, folder: Path
) -> Path:
    """report.md, table.json and kinds.png in `folder` (made if missing); report.md's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TABLE_FILE).write_text(json.dumps([r._asdict() for r in rows], indent=1) + "\n")
    (folder / FIGURE_FILE).write_bytes(kinds_figure(rows))
    report = folder / REPORT_FILE
    report.write_text(kinds_report(rows, plans, preset, command))
    return report
