"""Markdown reports of a run and of a sweep: a metric table and the figures beside it.

A report is the markdown text, the table as rows (for a Prefect table artifact) and the PNG
figures by file name; the markdown links the figures by those names, so the folder it is
written to reads as a page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

from sae_core.config import TRANSCODER_KINDS
from sae_core.evaluation.metrics import DensityHistogram
from sae_core.studies import plots
from sae_core.studies.convergence import fit_convergence_exponent, tokens_to_convergence
from sae_core.studies.points import measured_columns, saebench_columns
from sae_core.studies.scaling import NAMES, PAPER, ScalingFit
from sae_core.studies.sweep import SweepRow

REPORT_FILE = "report.md"

# Metric name -> what it means, in report order; absent metrics are skipped.
METRICS = {
    "nmse": "normalised MSE, SAE input space (the training loss)",
    "fvu": "fraction of variance unexplained, raw activations",
    "l0": "active latents per token",
    "dead_fraction": "latents that never fired on the eval tokens",
    "ce_clean": "next-token CE, clean model (nats)",
    "ce_spliced": "next-token CE, reconstruction spliced in",
    "ce_zero": "next-token CE, hook zero-ablated",
    "ce_mean": "next-token CE, hook mean-ablated",
    "delta_lm_loss": "CE spliced - CE clean",
    "ce_loss_recovered": "CE loss recovered vs zero ablation",
    "ce_loss_recovered_mean": "CE loss recovered vs mean ablation",
    "kl_spliced": "KL(clean || spliced) next-token distribution (nats)",
    "ablation_sparsity": "(L1/L2)^2 / (T V) of single-latent ablation effects",
    "probe_loss": "best single-latent probe, held-out CE, mean over tasks",
    "probe_baseline_loss": "base-rate CE of the same tasks",
    "probe_loss_sequence": "probe loss, genre tasks",
    "probe_loss_token": "probe loss, POS tasks",
    "eval_tokens": "eval tokens scored",
}
SAEBENCH_NOTE = (
    "SAEBench's offline evaluations (sae_core.stages.saebench): explained_variance to "
    "mean_max_decoder_cosine are its core metrics; absorption_full and absorption_fraction its "
    "first-letter absorption (lower is better); sparse_probe_acc_k*: balanced accuracy of k-sparse "
    "probes, mean over the genre and part-of-speech tasks.\n"
)
TRANSCODER_NOTE = (
    "Transcoders (kind transcoder, skip_transcoder) predict model.hook_out's activation y from "
    "model.hook's: their nmse and fvu are of y, their CE and KL with the prediction spliced in "
    "place of y, SAEBench's core metrics compare y with the prediction, and the scaling law is "
    "fitted to the NMSE of y. Single-latent ablation sparsity and SAEBench's absorption do not "
    "apply to them.\n"
)
SWEEP_COLUMNS = ("nmse", "fvu", "l0", "dead_fraction", "ce_loss_recovered", "kl_spliced",
                 "ablation_sparsity", "probe_loss")  # fmt: skip


class Report(NamedTuple):
    markdown: str
    table: list[dict[str, Any]]
    images: dict[str, bytes]  # file name -> PNG


def _fmt(value: Any) -> str:
    if value is None:  # not measured for this row (e.g. a metric that does not apply to its kind)
        return "n/a"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _md_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _images(images: dict[str, bytes], captions: dict[str, str]) -> str:
    return "\n".join(f"### {captions[name]}\n\n![{captions[name]}]({name})\n" for name in images)


def _phases(seconds: dict[str, float]) -> list[dict[str, Any]]:
    """Longest phase first, the total last."""
    order = sorted((k for k in seconds if k != "total"), key=lambda k: -seconds[k])
    return [{"phase": k, "seconds": seconds[k]} for k in [*order, "total"] if k in seconds]


def run_report(
    title: str,
    config: dict[str, Any],
    metrics: dict[str, float],
    probes: list[dict[str, Any]],
    history: list[dict[str, float]],
    density: DensityHistogram,
    seconds: dict[str, float],
    links: dict[str, str],
) -> Report:
    """One SAE: config summary, metric table, probe tasks, timings, training curve, density."""
    table = [
        {"metric": name, "value": metrics[name], "meaning": meaning}
        for name, meaning in METRICS.items()
        if name in metrics
    ]
    images = {
        "training_curves.png": plots.training_curves([(title, history)]),
        "latent_density.png": plots.density_histogram(density),
    }
    captions = {"training_curves.png": "Training curves", "latent_density.png": "Latent density"}
    parts = [
        f"# {title}\n",
        " ".join(f"**{k}** {v}" for k, v in config.items()) + "\n",
        "## Metrics\n",
        _md_table(table),
        "## Probe tasks\n",
        "Best single latent (encoder pre-activation) as a 1-D logistic probe, fitted on one half "
        "of the documents and scored on the other (cross-entropy, nats).\n",
        _md_table(probes),
        "## Where the evaluation's time went (s)\n",
        _md_table(_phases(seconds)),
        "## Figures\n",
        _images(images, captions),
        "## Data\n",
        "\n".join(f"- {k}: `{v}`" for k, v in links.items()) + "\n",
    ]
    return Report("\n".join(parts), table, images)


def _fit_table(fit: ScalingFit) -> list[dict[str, Any]]:
    return [
        {"coefficient": name, "fitted": fit.params[name], "paper (GPT-4)": paper}
        for name, paper in zip(NAMES, PAPER, strict=True)
    ]


def sweep_report(
    title: str,
    rows: Sequence[SweepRow],
    fit: ScalingFit | None,
    histories: Sequence[tuple[str, list[dict]]],
) -> Report:
    """A grid of SAEs (rows and their training histories, in the same order): metric table,
    scaling-law fit and the sweep figures."""
    bench = saebench_columns(r.metrics for r in rows)
    # Columns no SAE measured (probes off, ablation for transcoders) are left out.
    columns = measured_columns(SWEEP_COLUMNS, (r.metrics for r in rows))
    table = [
        {"n": r.n, "k": r.k, "seed": r.seed, "kind": r.kind}
        | {c: r.metrics.get(c) for c in (*columns, *bench)}
        | {"dead_fraction_train": r.train_dead_fraction}
        for r in sorted(rows, key=lambda r: (r.n, r.k, r.seed))
    ]
    images = {
        "nmse_vs_l0.png": plots.nmse_frontier(rows),
        "ce_recovered_vs_l0.png": plots.ce_recovered_frontier(rows),
        "nmse_vs_n.png": plots.nmse_vs_n(rows, [fit.params[n] for n in NAMES] if fit else None),
        "dead_vs_n.png": plots.dead_vs_n(rows),
        "training_curves.png": plots.training_curves(histories, [(r.n, r.k) for r in rows]),
    }
    captions = {
        "nmse_vs_l0.png": "NMSE vs L0 frontier",
        "ce_recovered_vs_l0.png": "CE loss recovered vs L0",
        "nmse_vs_n.png": "NMSE vs n at fixed k, with the fitted law",
        "dead_vs_n.png": "Dead fraction vs n",
        "training_curves.png": "Training curves",
    }
    parts = [f"# {title}\n", f"{len(rows)} SAEs.\n", "## Metrics (eval split)\n", _md_table(table)]
    if any(r.kind in TRANSCODER_KINDS for r in rows):
        parts.append(TRANSCODER_NOTE)
    if bench:
        parts.append(SAEBENCH_NOTE)
    if fit is not None:
        loo = "n/a (< 8 points)" if fit.loo_rel_err is None else f"{fit.loo_rel_err:.3%}"
        parts += [
            "## Scaling law\n",
            "L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k), "
            f"fitted to the eval NMSE of {fit.points} SAEs by least squares on log L.\n",
            _md_table(_fit_table(fit)),
            f"Fit error: RMS of log(L_fit / L) = {fit.rmse_log:.4f}; max relative error "
            f"{fit.max_rel_err:.3%}; leave-one-out mean relative error {loo}.\n",
        ]
    parts += _convergence_section(rows, [history for _, history in histories])
    parts += ["## Figures\n", _images(images, captions)]
    return Report("\n".join(parts), table, images)


# Relative falls in loss per doubling of tokens below which a run counts as converged.
CONVERGENCE_TOLERANCES = (0.10, 0.07, 0.05)


def _convergence_section(rows: Sequence[SweepRow], histories: Sequence[list[dict]]) -> list[str]:
    """Tokens to convergence per point at each tolerance and the exponent of n they grow with
    (sae_core.studies.convergence); Gao et al.: about 0.6."""
    found = {
        tol: [tokens_to_convergence(h, tol) for h in histories] for tol in CONVERGENCE_TOLERANCES
    }
    table = [
        {"n": r.n, "k": r.k, "seed": r.seed, "tokens trained": h[-1]["tokens"] if h else 0}
        | {f"converged at ({tol:.0%}/doubling)": found[tol][i] or "not yet" for tol in found}
        for i, (r, h) in enumerate(zip(rows, histories, strict=True))
    ]
    lines = []
    for tol, tokens in found.items():
        fit = fit_convergence_exponent([r.n for r in rows], [r.k for r in rows], tokens)
        if fit is None:
            lines.append(f"- {tol:.0%} per doubling: too few converged points for an exponent.")
            continue
        err = "" if fit.stderr is None else f" ± {fit.stderr:.2f}"
        per_k = ", ".join(f"k={k}: {a:.2f}" for k, a in fit.per_k.items())
        lines.append(
            f"- {tol:.0%} per doubling: tokens to convergence ~ n^{fit.exponent:.2f}{err} "
            f"({fit.points} points; per k: {per_k}); Gao et al.: about n^0.6."
        )
    return [
        "## Tokens to convergence\n",
        "A run counts as converged from the point where its training-batch NMSE falls by less "
        "than the tolerance per doubling of tokens, to the end of the run; 'not yet' where it "
        "still falls faster at the end. In the first epoch each batch is unseen when scored (a "
        "held-out estimate); past it, batches repeat.\n",
        _md_table(table),
        "\n".join(lines) + "\n",
    ]


def frontier_report(
    title: str, table: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]]
) -> Report:
    """The storage-fidelity frontier (sae_core.studies.frontier): per-SAE table, the seed-averaged
    table in the paper's shape and the frontier plot."""
    images = {"frontier.png": plots.frontier(summary)}
    captions = {"frontier.png": "Storage-fidelity frontier"}
    parts = [
        f"# {title}\n",
        "Dense TopK reference, expander SAEs by degree d (d non-zeros per decoder direction) and "
        "dense SAEs with as many decoder values as each expander (n' = d n / m). compression = "
        "dense decoder values / decoder values (m / d for an expander); bytes_ratio = dense "
        "artifact bytes / artifact bytes; retained = CE loss recovered / the dense reference's "
        "(same seed).\n",
        *([SAEBENCH_NOTE] if saebench_columns(table) else []),
        "## Averaged over seeds\n",
        _md_table(list(summary)),
        "## Every SAE\n",
        _md_table(list(table)),
        "## Figures\n",
        _images(images, captions),
    ]
    return Report("\n".join(parts), list(table), images)
