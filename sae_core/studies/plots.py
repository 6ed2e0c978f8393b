"""Figures of a run and of a sweep, as PNG bytes (matplotlib's object API on the Agg canvas:
no pyplot, no global backend, safe in worker threads)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sae_core.evaluation.metrics import DensityHistogram
from sae_core.studies.scaling import scaling_law
from sae_core.studies.sweep import SweepRow

_DPI = 110


def _figure(ncols: int = 1, width: float = 5.6, height: float = 4.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    return fig, axes


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _colors(values: Sequence[int], cmap: str = "viridis") -> dict[int, tuple]:
    from matplotlib import colormaps

    ordered = sorted(set(values))
    scale = colormaps[cmap]
    return {v: scale(0.15 + 0.7 * i / max(len(ordered) - 1, 1)) for i, v in enumerate(ordered)}


def _n_axis(ax, ns: Sequence[int]) -> None:
    """Log-2 n axis ticked at the measured widths (the default ticks miss 1152, 2304)."""
    ax.set_xscale("log", base=2)
    ticks = sorted(set(ns))
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()


def _by(rows: Sequence[SweepRow], key: str) -> dict[int, list[SweepRow]]:
    groups: dict[int, list[SweepRow]] = {}
    for row in rows:
        groups.setdefault(getattr(row, key), []).append(row)
    return dict(sorted(groups.items()))


def _vs_l0(rows: Sequence[SweepRow], metric: str, ylabel: str, title: str, logy: bool) -> bytes:
    """One line per n through its k values, metric against measured L0."""
    fig, (ax,) = _figure()
    colors = _colors([r.n for r in rows])
    for n, group in _by(rows, "n").items():
        group = sorted(group, key=lambda r: (r.metrics["l0"], r.seed))
        ax.plot(
            [r.metrics["l0"] for r in group],
            [r.metrics[metric] for r in group],
            "o-",
            color=colors[n],
            label=f"n = {n}",
        )
        for r in group:
            ax.annotate(
                f"k={r.k}", (r.metrics["l0"], r.metrics[metric]), fontsize=7,
                xytext=(4, 3), textcoords="offset points",
            )  # fmt: skip
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    return _png(fig)


def nmse_frontier(rows: Sequence[SweepRow]) -> bytes:
    return _vs_l0(rows, "nmse", "normalised MSE (eval)", "Sparsity-reconstruction frontier", True)


def ce_recovered_frontier(rows: Sequence[SweepRow]) -> bytes:
    return _vs_l0(
        rows, "ce_loss_recovered", "CE loss recovered (vs zero ablation)", "Downstream loss", False
    )


def nmse_vs_n(rows: Sequence[SweepRow], params: Sequence[float] | None) -> bytes:
    """Measured NMSE against n, one colour per k, with the fitted L(n, k) as lines."""
    fig, (ax,) = _figure()
    colors = _colors([r.k for r in rows], "plasma")
    ns = [r.n for r in rows]
    grid = np.geomspace(min(ns) / 1.3, max(ns) * 1.3, 100)
    for k, group in _by(rows, "k").items():
        ax.plot(
            [r.n for r in group], [r.metrics["nmse"] for r in group], "o", color=colors[k],
            label=f"k = {k}",
        )  # fmt: skip
        if params is not None:
            ax.plot(grid, scaling_law(params, grid, np.full_like(grid, k)), "-", color=colors[k])
    _n_axis(ax, ns)
    ax.set_yscale("log")
    ax.set_xlabel("n (latents)")
    ax.set_ylabel("normalised MSE (eval)")
    ax.set_title("NMSE vs n" + (": points measured, lines fitted L(n, k)" if params else ""))
    ax.legend()
    return _png(fig)


def dead_vs_n(rows: Sequence[SweepRow]) -> bytes:
    """Dead fraction against n, one colour per k: solid over the eval tokens, dashed by the
    training criterion (silent for the dead window)."""
    fig, (ax,) = _figure()
    colors = _colors([r.k for r in rows], "plasma")
    for k, group in _by(rows, "k").items():
        group = sorted(group, key=lambda r: r.n)
        n = [r.n for r in group]
        ax.plot(
            n,
            [r.metrics["dead_fraction"] for r in group],
            "o-",
            color=colors[k],
            label=f"k = {k}, eval",
        )
        ax.plot(
            n,
            [r.train_dead_fraction for r in group],
            "s--",
            color=colors[k],
            alpha=0.6,
            label=f"k = {k}, training",
        )
    _n_axis(ax, [r.n for r in rows])
    ax.set_xlabel("n (latents)")
    ax.set_ylabel("fraction of dead latents")
    ax.set_ylim(bottom=0)
    ax.set_title("Dead latents")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def training_curves(
    curves: Sequence[tuple[str, list[dict]]], nk: Sequence[tuple[int, int]] | None = None
) -> bytes:
    """NMSE and dead fraction against training tokens, one line per SAE (label, history.json).

    nk: each curve's (n, k), for a sweep: colour by n, line style by k.
    """
    fig, (left, right) = _figure(ncols=2)
    colors = _colors([n for n, _ in nk]) if nk else {}
    dashes = ["-", "--", ":", "-."]
    styles = {k: dashes[i % 4] for i, k in enumerate(sorted({k for _, k in nk or []}))}
    for i, (label, history) in enumerate(curves):
        style = {"color": colors[nk[i][0]], "ls": styles[nk[i][1]]} if nk else {}
        tokens = [row["tokens"] for row in history]
        left.plot(tokens, [row["nmse"] for row in history], label=label, lw=1.3, **style)
        right.plot(tokens, [row["dead_fraction"] for row in history], lw=1.3, **style)
    left.set_yscale("log")
    left.set_xlabel("training tokens")
    left.set_ylabel("normalised MSE (training batch)")
    left.set_title("Training loss")
    right.set_xlabel("training tokens")
    right.set_ylabel("fraction of dead latents")
    right.set_ylim(bottom=0)
    right.set_title("Dead latents during training")
    left.legend(fontsize=7, ncol=2 if len(curves) > 5 else 1)
    return _png(fig)


def frontier(summary: Sequence[dict]) -> bytes:
    """Storage-fidelity frontier (sae_core.studies.frontier.frontier_summary rows): CE recovered
    retained against decoder compression, log x; expanders and parameter-matched dense SAEs,
    error bars one standard deviation over seeds, each point labelled with its degree."""
    fig, (ax,) = _figure(width=6.4, height=4.4)
    plotted = False
    styles = {"expander": ("o-", "C0", "expander SAE"),
              "matched": ("s--", "C1", "dense SAE, matched decoder values")}  # fmt: skip
    for family, (marker, color, label) in styles.items():
        rows = sorted(
            (r for r in summary if r["family"] == family and np.isfinite(r["retained"])),
            key=lambda r: r["compression"],
        )  # CE recovered is NaN where ablating the hook does not hurt the model
        if not rows:
            continue
        plotted = True
        x = [r["compression"] for r in rows]
        y = [r["retained"] for r in rows]
        ax.errorbar(x, y, yerr=[r["retained_std"] for r in rows], fmt=marker, color=color,
                    capsize=3, label=label, lw=1.3, ms=5)  # fmt: skip
        if family == "expander":
            for r in rows:
                ax.annotate(f"d={r['degree']}", (r["compression"], r["retained"]), fontsize=7,
                            xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.axhline(1.0, color="gray", lw=1, ls=":", label="dense reference")
    if plotted:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no finite CE loss recovered", ha="center", transform=ax.transAxes)
    ax.set_xlabel("compression (dense decoder values / decoder values)")
    ax.set_ylabel("CE loss recovered, retained vs dense")
    ax.set_title("Storage-fidelity frontier")
    ax.legend(fontsize=8, loc="lower left")
    return _png(fig)


def density_histogram(hist: DensityHistogram) -> bytes:
    """Latents by log10 firing density over the eval tokens; dead latents in the title."""
    fig, (ax,) = _figure()
    edges = np.asarray(hist.edges)
    ax.bar(edges[:-1], hist.counts, width=np.diff(edges), align="edge", color="tab:blue")
    ax.set_xlabel("log10(fraction of eval tokens the latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"Latent density ({hist.dead} dead latents not shown)")
    return _png(fig)


def recipe_frontier(points: Sequence) -> bytes:
    """Quality per token (sae_core.studies.recipes points): held-out per-token NMSE, fvu and CE
    loss recovered against training tokens, one line per trainer."""
    fig, axes = _figure(ncols=3, width=4.4)
    trainers = sorted({p.trainer for p in points})
    panels = (
        ("nmse_per_token", "held-out NMSE (per token)", True),
        ("fvu", "held-out fvu (raw activations)", True),
        ("ce_loss_recovered", "CE loss recovered", False),
    )
    for ax, (field, label, logy) in zip(axes, panels, strict=True):
        for trainer in trainers:
            mine = sorted((p for p in points if p.trainer == trainer), key=lambda p: p.tokens)
            mine = [p for p in mine if getattr(p, field) is not None]
            ax.plot(
                [p.tokens for p in mine], [getattr(p, field) for p in mine], "o-", label=trainer
            )
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
    axes[0].legend()
    return _png(fig)
