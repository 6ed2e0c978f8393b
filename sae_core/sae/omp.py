"""Orthogonal matching pursuit, batched over tokens: an inference-time alternative to an SAE's
encoder (it closes part of the "amortisation gap" of small dictionaries)."""

from __future__ import annotations

import torch

_PIVOT_EPS = 1e-6  # a new atom this close to the span of the chosen ones adds nothing


@torch.no_grad()
def omp(x: torch.Tensor, D: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k greedy atoms per row of x, the coefficients refitted by least squares at every step.

    x: [B, m]; D: [n, m] unit-norm atoms -> (idx [B, k] int64 in the order chosen, vals [B, k]
    signed least-squares coefficients of x on those atoms). Each step picks the atom most
    correlated (in absolute value) with the residual, grows the Cholesky factor of the chosen
    atoms' Gram matrix by one row and re-solves. An atom within 1e-6 of the chosen ones' span
    gets coefficient 0 (the fit is then over fewer atoms).

    Cost: per step a [B, m] x [m, n] product (2 B m n flops), the new Gram row (B s m), two
    triangular solves (B s^2): in all 2 B m n k + O(B k^2 m + B k^3). Memory: B k m (the
    chosen atoms) + B n (the correlations).
    """
    B, m = x.shape
    n = D.shape[0]
    rows = torch.arange(B, device=x.device)
    idx = torch.zeros(B, k, dtype=torch.int64, device=x.device)
    atoms = x.new_zeros(B, k, m)
    L = x.new_zeros(B, k, k)  # Cholesky factor of the chosen atoms' Gram matrix
    y = x.new_zeros(B, k)  # L^-1 (atoms x): forward-substituted right-hand side
    chosen = torch.zeros(B, n, dtype=torch.bool, device=x.device)
    coef = x.new_zeros(B, 0)
    residual = x
    for s in range(k):
        corr = (residual @ D.t()).abs_().masked_fill_(chosen, -1.0)
        j = corr.argmax(dim=1)
        chosen[rows, j] = True
        a = D[j]  # [B, m]
        idx[:, s], atoms[:, s] = j, a
        if s:
            gram = torch.bmm(atoms[:, :s], a.unsqueeze(2))  # [B, s, 1]
            w = torch.linalg.solve_triangular(L[:, :s, :s], gram, upper=False).squeeze(2)
        else:
            w = x.new_zeros(B, 0)
        pivot = (a * a).sum(dim=1) - (w * w).sum(dim=1)
        ok = pivot > _PIVOT_EPS
        L[:, s, :s] = w * ok.unsqueeze(1)
        L[:, s, s] = torch.where(ok, pivot.clamp_min(_PIVOT_EPS).sqrt(), 1.0)
        rhs = (a * x).sum(dim=1) - (w * y[:, :s]).sum(dim=1)
        y[:, s] = torch.where(ok, rhs / L[:, s, s], 0.0)
        Ls = L[:, : s + 1, : s + 1]
        coef = torch.linalg.solve_triangular(Ls.mT, y[:, : s + 1, None], upper=True).squeeze(2)
        residual = x - torch.bmm(coef.unsqueeze(1), atoms[:, : s + 1]).squeeze(1)
    return idx, coef
