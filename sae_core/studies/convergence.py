"""Tokens to convergence, read from training curves, and how they grow with n (Gao et al. 2024
find about n^0.6 on GPT-2 small).

A run is taken as converged from the point where its loss improves by less than `tolerance` per
doubling of the tokens seen, and keeps doing so to the end of the run. The loss is the one
logged before each step on that step's batch: on a single pass over the data every batch is
unseen when it is scored, so the curve is a held-out estimate at no extra cost (under the
schedule-free recipe it is scored at the gradient point y, next to the shipped average x). A
run that is still improving faster at its end has no convergence point: it gives None, never
its length, so a budget that grows as n^0.6 does not put 0.6 into the measured exponent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Below this many tokens the curve is warm-up and initialisation, not convergence.
FIRST_TOKENS = 2**16


class CurvePoint(NamedTuple):
    tokens: float
    """Geometric mean of the tokens seen at the bin's steps."""
    nmse: float
    """Mean of the steps' training-batch NMSE in the bin."""


def binned_curve(history: Sequence[dict], bins_per_doubling: int = 2) -> list[CurvePoint]:
    """The NMSE curve (history.json rows: `tokens`, `nmse`) averaged over bins of equal width in
    log2(tokens), from FIRST_TOKENS on; empty bins are skipped."""
    bins: dict[int, list[tuple[float, float]]] = {}
    for row in history:
        tokens = row["tokens"]
        if tokens < FIRST_TOKENS:
            continue
        index = math.floor(math.log2(tokens) * bins_per_doubling)
        bins.setdefault(index, []).append((math.log(tokens), row["nmse"]))
    return [
        CurvePoint(math.exp(np.mean([t for t, _ in rows])), float(np.mean([v for _, v in rows])))
        for _, rows in sorted(bins.items())
    ]


def improvement_per_doubling(
    curve: Sequence[CurvePoint], bins_per_doubling: int = 2
) -> list[float]:
    """For each bin from the second doubling on: 1 - (L_i / L_j)^(1 / doublings between them),
    j the bin one doubling earlier; the relative fall in loss per doubling of tokens."""
    out = []
    for i in range(bins_per_doubling, len(curve)):
        now, then = curve[i], curve[i - bins_per_doubling]
        doublings = math.log2(now.tokens / then.tokens)
        out.append(1 - (now.nmse / then.nmse) ** (1 / doublings))
    return out


def tokens_to_convergence(
    history: Sequence[dict], tolerance: float, bins_per_doubling: int = 2
) -> float | None:
    """The tokens from which the loss falls by less than `tolerance` per doubling of tokens to
    the end of the run; None if it is still falling faster at the end (or the run is too short
    to tell: under two doublings past FIRST_TOKENS)."""
    curve = binned_curve(history, bins_per_doubling)
    rates = improvement_per_doubling(curve, bins_per_doubling)
    if not rates or rates[-1] >= tolerance:
        return None
    first = len(rates) - 1
    while first > 0 and rates[first - 1] < tolerance:
        first -= 1
    return curve[first + bins_per_doubling].tokens


class ConvergenceFit(NamedTuple):
    exponent: float
    """alpha in tokens-to-convergence ~ n^alpha, one alpha shared by every k (own intercepts)."""
    stderr: float | None
    """alpha's standard error from the fit's residuals; None with no residual degrees of freedom."""
    per_k: dict[int, float]
    """alpha fitted on each k alone, where that k has two or more n."""
    points: int
    """(n, k) points that converged and entered the fit."""


def fit_convergence_exponent(
    n: Sequence[int], k: Sequence[int], tokens: Sequence[float | None]
) -> ConvergenceFit | None:
    """Least squares of log T = c_k + alpha log n over the points with a convergence point;
    None when no k has two distinct n to compare."""
    rows = [(nn, kk, t) for nn, kk, t in zip(n, k, tokens, strict=True) if t is not None]
    ks = sorted({kk for _, kk, _ in rows if len({nn for nn, k2, _ in rows if k2 == kk}) > 1})
    rows = [r for r in rows if r[1] in ks]
    if not ks:
        return None
    design = np.array([[math.log(nn)] + [float(kk == c) for c in ks] for nn, kk, _ in rows])
    target = np.log([t for _, _, t in rows])
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    dof = len(rows) - design.shape[1]
    stderr = None
    if dof > 0:
        sigma2 = float(np.sum((design @ coef - target) ** 2)) / dof
        stderr = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[0, 0])
    per_k = {}
    for kk in ks:
        ln = np.log([nn for nn, k2, _ in rows if k2 == kk])
        lt = np.log([t for _, k2, t in rows if k2 == kk])
        per_k[kk] = float(np.polyfit(ln, lt, 1)[0])
    return ConvergenceFit(float(coef[0]), stderr, per_k, len(rows))
