"""The scaling law of Gao et al. (2024) for the normalised MSE of a converged TopK SAE:

    L(n, k) = exp(a + b_k log k + b_n log n + g log k log n) + exp(z + e log k)

(natural logs; n latents, k active). The first term shrinks with n at a rate that depends on k;
the second is the loss no width removes at that k. Fitted by least squares on log L, which
weighs every point by its relative error.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy.optimize import least_squares

NAMES = ("a", "b_k", "b_n", "g", "z", "e")
# The paper's fit on GPT-4 activations: the starting point of every fit here.
PAPER = (-0.50, 0.26, -0.017, -0.042, -1.32, -0.085)


def _terms(params: np.ndarray | tuple[float, ...], n: np.ndarray, k: np.ndarray) -> tuple:
    a, b_k, b_n, g, z, e = params
    ln, lk = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(k, dtype=float))
    return np.exp(a + b_k * lk + b_n * ln + g * lk * ln), np.exp(z + e * lk), ln, lk


def scaling_law(params: np.ndarray | tuple[float, ...], n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """L(n, k) for parameters in NAMES order; n, k: arrays of the same shape."""
    reducible, floor, _, _ = _terms(params, n, k)
    return reducible + floor


class ScalingFit(BaseModel):
    """A fitted law and how well it fits (a pydantic model: it travels between tasks)."""

    model_config = ConfigDict(frozen=True)

    params: dict[str, float]  # NAMES -> value
    rmse_log: float  # root mean square of log(L_fit / L) over the points
    max_rel_err: float  # max |L_fit / L - 1|
    loo_rel_err: float | None  # mean |L_loo / L - 1| leaving each point out; None if < 8 points
    points: int


def _fit_params(
    n: np.ndarray, k: np.ndarray, loss: np.ndarray, starts: int, seed: int
) -> np.ndarray:
    """Best of several least-squares fits on log L, from the paper's values and seeded jitters
    of them (the objective is not convex)."""
    target = np.log(loss)

    def residual(p: np.ndarray) -> np.ndarray:
        return np.log(scaling_law(p, n, k)) - target

    def jacobian(p: np.ndarray) -> np.ndarray:
        # d log L / dp: analytic, so a fit costs milliseconds rather than finite differences.
        t1, t2, ln, lk = _terms(p, n, k)
        cols = [t1, t1 * lk, t1 * ln, t1 * lk * ln, t2, t2 * lk]
        return np.stack(cols, axis=1) / (t1 + t2)[:, None]

    rng = np.random.default_rng(seed)
    best: np.ndarray | None = None
    best_cost = np.inf
    for i in range(starts):
        x0 = np.asarray(PAPER) + (0 if i == 0 else rng.normal(scale=0.5, size=len(PAPER)))
        # trf accepts fewer points than parameters (a small grid), where lm would refuse.
        sol = least_squares(residual, x0, jac=jacobian, method="trf", max_nfev=2000)
        if sol.cost < best_cost:
            best, best_cost = sol.x, sol.cost
    return best


def fit_scaling_law(
    n: list[int], k: list[int], loss: list[float], starts: int = 8, seed: int = 0
) -> ScalingFit:
    """Fit L(n, k) to measured losses (one per trained SAE; repeated seeds are separate points)."""
    n_arr, k_arr = np.asarray(n, dtype=float), np.asarray(k, dtype=float)
    loss_arr = np.asarray(loss, dtype=float)
    if len(loss_arr) < 2 or not np.all(np.isfinite(loss_arr)) or np.any(loss_arr <= 0):
        raise ValueError("the scaling fit needs at least 2 points with finite positive losses")
    params = _fit_params(n_arr, k_arr, loss_arr, starts, seed)
    ratio = scaling_law(params, n_arr, k_arr) / loss_arr
    loo = None
    if len(loss_arr) >= 8:
        errors = []
        for i in range(len(loss_arr)):
            keep = np.arange(len(loss_arr)) != i
            p = _fit_params(n_arr[keep], k_arr[keep], loss_arr[keep], starts, seed)
            errors.append(
                abs(scaling_law(p, n_arr[i : i + 1], k_arr[i : i + 1])[0] / loss_arr[i] - 1)
            )
        loo = float(np.mean(errors))
    return ScalingFit(
        params={name: float(v) for name, v in zip(NAMES, params, strict=True)},
        rmse_log=float(np.sqrt(np.mean(np.log(ratio) ** 2))),
        max_rel_err=float(np.max(np.abs(ratio - 1))),
        loo_rel_err=loo,
        points=len(loss_arr),
    )
