"""Every evaluation metric, defined once: the formulas, as functions and streaming accumulators.

Conventions (the same for every flow):
- Reconstruction is measured in two spaces. `nmse` is the paper's normalised MSE where the SAE
  works: on its normalised inputs (per-token centred and unit-norm in the demo), the same
  quantity as the training loss and the L(n, k) of the scaling law. `fvu` (fraction of variance
  unexplained) is the same ratio on the raw activations the model sees. Both are
  sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the eval tokens (position 0 excluded when
  the data config skips it).
- Downstream metrics compare next-token predictions with the hook's activation replaced at
  those same positions; predictions made from an excluded position are left out of every
  variant, so the baselines see exactly the positions the SAE touches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


# Reconstruction ---------------------------------------------------------------------------------
def unexplained_variance(x: Tensor, x_hat: Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over a batch. x, x_hat: [N, d].

    0 is perfect, 1 is no better than predicting the mean. On raw activations this is the FVU;
    on the SAE's normalised inputs, the paper's normalised MSE.
    """
    stats = VarianceStats()
    stats.update(x, x_hat)
    return stats.result()


@dataclass
class VarianceStats:
    """Streams `unexplained_variance` over batches (the mean is over all tokens seen)."""

    tokens: int = 0
    sq_err: float = 0.0
    sum_x: Tensor | None = None
    sum_sq_x: float = 0.0

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: [N, d]."""
        x = x.double()
        self.tokens += x.shape[0]
        self.sq_err += float((x - x_hat.double()).pow(2).sum())
        s = x.sum(dim=0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_x += float(x.pow(2).sum())

    def result(self) -> float:
        if self.tokens == 0:
            raise ValueError("no tokens were evaluated")
        # Variance around the mean from running sums: sum ||x||^2 - N ||mean||^2 (in float64).
        variance = self.sum_sq_x - float(self.sum_x.pow(2).sum()) / self.tokens
        return self.sq_err / variance


def latent_density(fire_counts: Tensor, tokens: int) -> Tensor:
    """Fraction of tokens on which each latent fires. fire_counts: [n] -> [n] float64."""
    return fire_counts.double() / max(tokens, 1)


class DensityHistogram(NamedTuple):
    """Histogram of log10(latent density) over the latents that fired at least once."""

    edges: list[float]  # [bins + 1] log10 density
    counts: list[int]  # [bins]
    dead: int  # latents that never fired (density 0, off the log axis)


def density_histogram(density: Tensor, tokens: int, per_decade: int = 10) -> DensityHistogram:
    """density: [n] from `latent_density`. Bins span 1/tokens (one firing) to 1 (every token)."""
    low = math.floor(math.log10(1.0 / max(tokens, 1)))
    edges = torch.linspace(low, 0.0, -low * per_decade + 1, dtype=torch.float64)
    alive = density[density > 0]
    counts = torch.histogram(alive.log10().clamp(low, 0.0), bins=edges).hist
    return DensityHistogram(
        edges=edges.tolist(),
        counts=[int(c) for c in counts],
        dead=int((density == 0).sum()),
    )


@dataclass
class ReconstructionStats:
    """Streams nmse (normalised space), fvu (raw space), L0 and latent firing counts."""

    n_latents: int
    normalized: VarianceStats = field(default_factory=VarianceStats)
    raw: VarianceStats = field(default_factory=VarianceStats)
    active_total: int = 0
    fire_counts: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.long)

    def update(
        self,
        x: Tensor,
        x_hat: Tensor,
        x_norm: Tensor,
        recon_norm: Tensor,
        latent_idx: Tensor,
        latent_vals: Tensor,
    ) -> None:
        """x, x_hat: [N, d] raw; x_norm, recon_norm: [N, d] in the SAE's normalised space;
        latent_idx, latent_vals: [N, k] (a latent fires on a token when its value is > 0)."""
        self.raw.update(x, x_hat)
        self.normalized.update(x_norm, recon_norm)
        fired = latent_vals > 0
        self.active_total += int(fired.sum())
        self.fire_counts += torch.bincount(
            latent_idx[fired].flatten().cpu(), minlength=self.n_latents
        )

    def result(self) -> dict[str, float]:
        tokens = self.raw.tokens
        return {
            "nmse": self.normalized.result(),
            "fvu": self.raw.result(),
            "l0": self.active_total / max(tokens, 1),
            "dead_fraction": float((self.fire_counts == 0).double().mean()),
            "eval_tokens": float(tokens),
        }

    def histogram(self) -> DensityHistogram:
        return density_histogram(latent_density(self.fire_counts, self.raw.tokens), self.raw.tokens)


# Downstream -------------------------------------------------------------------------------------
def next_token_logprobs(logits: Tensor, first: int = 0) -> Tensor:
    """Log-probabilities of the next token predicted from positions first..T-2 (those with a
    target). logits: [B, T, V] -> [B, T - 1 - first, V] float32."""
    return logits[:, first:-1].float().log_softmax(dim=-1)


def ce_from_logprobs(logprobs: Tensor, input_ids: Tensor, first: int = 0) -> Tensor:
    """Summed next-token cross-entropy. logprobs: [B, T - 1 - first, V] from
    `next_token_logprobs`; input_ids: [B, T]. Returns a 0-d tensor over B * (T - 1 - first) terms."""
    target = input_ids[:, first + 1 :]
    return -logprobs.gather(-1, target.unsqueeze(-1)).sum()


def kl_from_logprobs(ref: Tensor, other: Tensor) -> Tensor:
    """Summed KL(P_ref || P_other) over positions; both [B, P, V] log-probabilities -> 0-d."""
    return F.kl_div(other, ref, log_target=True, reduction="sum")


def next_token_ce(logits: Tensor, input_ids: Tensor, first: int = 0) -> Tensor:
    """Summed next-token cross-entropy of predictions made from positions >= first.

    logits: [B, T, V]; input_ids: [B, T]. Returns a 0-d tensor: the sum over B * (T - 1 - first) terms.
    """
    return ce_from_logprobs(next_token_logprobs(logits, first), input_ids, first)


def next_token_kl(ref_logits: Tensor, logits: Tensor, first: int = 0) -> Tensor:
    """Summed KL(P_ref || P) of the next-token distributions predicted from positions
    first..T-2 (the positions `next_token_ce` scores). ref_logits, logits: [B, T, V] -> 0-d."""
    return kl_from_logprobs(
        next_token_logprobs(ref_logits, first), next_token_logprobs(logits, first)
    )


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 is perfect, 0 is no better than ablation."""
    gap = ce_ablated - ce_clean
    if gap <= 0:
        return float("nan")
    return (ce_ablated - ce_spliced) / gap


@dataclass
class DownstreamStats:
    """Sums of next-token CE (and KL from clean) per variant: clean, spliced, zero, mean.

    Each variant keeps its own term count, so sums computed elsewhere (a cached baseline over
    the same positions) can be added with `add`.
    """

    ce_sums: dict[str, float] = field(default_factory=dict)
    kl_sums: dict[str, float] = field(default_factory=dict)
    terms: dict[str, int] = field(default_factory=dict)

    def add(self, variant: str, ce_sum: float, terms: int, kl_sum: float | None = None) -> None:
        self.ce_sums[variant] = self.ce_sums.get(variant, 0.0) + float(ce_sum)
        self.terms[variant] = self.terms.get(variant, 0) + terms
        if kl_sum is not None:
            self.kl_sums[variant] = self.kl_sums.get(variant, 0.0) + float(kl_sum)

    def result(self) -> dict[str, float]:
        ce = {name: total / self.terms[name] for name, total in self.ce_sums.items()}
        out = {f"ce_{name}": value for name, value in ce.items()}
        out |= {f"kl_{name}": total / self.terms[name] for name, total in self.kl_sums.items()}
        if "spliced" in ce and "clean" in ce:
            out["delta_lm_loss"] = ce["spliced"] - ce["clean"]
            if "zero" in ce:
                out["ce_loss_recovered"] = ce_loss_recovered(ce["clean"], ce["spliced"], ce["zero"])
            if "mean" in ce:
                out["ce_loss_recovered_mean"] = ce_loss_recovered(
                    ce["clean"], ce["spliced"], ce["mean"]
                )
        return out


def ablation_sparsity(logit_diff: Tensor) -> Tensor:
    """How concentrated the effect of one ablation is on the downstream logits (Gao et al. 4.5).

    logit_diff: [A, T, V], ablated minus unablated logits at the ablated position and the T - 1
    after it, for A ablations. At each position the median over the vocabulary is subtracted (a
    shift common to all logits leaves the probabilities unchanged); the T * V numbers are then
    scored by (L1 / L2)^2, the effective number of (position, token) logits affected, divided by
    T * V. Returns [A] in (0, 1]: 1 / (T V) when one logit moves, 1 when all move equally.
    """
    centred = logit_diff.double() - logit_diff.double().median(dim=-1, keepdim=True).values
    flat = centred.flatten(start_dim=1)
    l1 = flat.abs().sum(dim=1)
    l2 = flat.norm(dim=1).clamp_min(1e-30)
    return (l1 / l2).pow(2) / flat.shape[1]


# Probes ---------------------------------------------------------------------------------------
def binary_ce(z: Tensor, y: Tensor) -> Tensor:
    """Mean logistic loss of logits z against labels y in {0, 1}, over dim 0. z: [N, m], y: [N]."""
    return (F.softplus(z) - y[:, None] * z).mean(dim=0)


def fit_logistic_1d(
    x: Tensor, y: Tensor, l2: float = 1e-4, iters: int = 30, tol: float = 1e-9
) -> tuple[Tensor, Tensor]:
    """One logistic regression per column: p(y=1) = sigmoid(w_j x_j + b_j), by Newton-Raphson.

    x: [N, m] (standardised columns), y: [N] in {0, 1}. The tiny ridge l2 on w keeps a
    separable column finite. A step is halved where it would raise the loss; the fit stops
    when no column's loss falls by more than `tol`. Returns (w, b): [m] each.
    """
    x, y = x.double(), y.double()
    rate = y.mean().clamp(1e-6, 1 - 1e-6)
    w = x.new_zeros(x.shape[1])
    b = x.new_full((x.shape[1],), float(torch.log(rate / (1 - rate))))

    def objective(w: Tensor, b: Tensor) -> Tensor:
        return binary_ce(x * w + b, y) + 0.5 * l2 * w.pow(2)

    loss = objective(w, b)
    for _ in range(iters):
        p = torch.sigmoid(x * w + b)
        r, s = p - y[:, None], p * (1 - p)
        gw, gb = (r * x).mean(0) + l2 * w, r.mean(0)
        hww, hwb, hbb = (s * x * x).mean(0) + l2, (s * x).mean(0), s.mean(0)
        det = (hww * hbb - hwb.pow(2)).clamp_min(1e-18)
        dw, db = (hbb * gw - hwb * gb) / det, (hww * gb - hwb * gw) / det
        step = torch.ones_like(w)
        for _ in range(8):  # backtracking, per column
            trial = objective(w - step * dw, b - step * db)
            worse = trial > loss
            if not bool(worse.any()):
                break
            step = torch.where(worse, step / 2, step)
        trial = torch.minimum(trial, loss)  # a column still worse after 8 halvings stays put
        moved = trial < loss
        w = torch.where(moved, w - step * dw, w)
        b = torch.where(moved, b - step * db, b)
        gain = float((loss - trial).max())
        loss = trial
        if gain < tol:
            break
    return w, b


def standardize(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Columns centred and scaled by the training statistics. [N, n], [M, n] -> float32 copies.

    Statistics in float64 without a float64 copy of x ([N, n] can be large).
    """
    mean = train_x.mean(0, dtype=torch.float64)
    std = (train_x.pow(2).mean(0, dtype=torch.float64) - mean.pow(2)).clamp_min(1e-24).sqrt()
    mean, std = mean.float(), std.float()
    return (train_x - mean) / std, (test_x - mean) / std


class ProbeFit(NamedTuple):
    """The best single-latent logistic probe of one binary task."""

    latent: int
    loss: float  # test cross-entropy (nats) of the chosen probe
    train_loss: float
    baseline_loss: float  # test cross-entropy of predicting the training base rate


def best_single_latent_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, candidates: int = 64
) -> ProbeFit:
    """Fit a 1-D logistic probe on each latent; keep the one with the lowest training loss.

    train_x: [N, n], test_x: [M, n] latent features, standardised (`standardize`);
    train_y: [N], test_y: [M] in {0, 1}. Exact Newton fits run on the `candidates` latents
    with the largest squared correlation with the label (the score test: the loss drop of a
    first Newton step is proportional to it); the others are not fitted. The reported loss is
    on the held-out test set, so choosing among n latents does not flatter it.
    """
    train_y, test_y = train_y.double(), test_y.double()
    centred_y = (train_y - train_y.mean()).to(train_x.dtype)
    pick = (train_x.T @ centred_y).abs().topk(min(candidates, train_x.shape[1])).indices
    xs = train_x[:, pick]
    w, b = fit_logistic_1d(xs, train_y)
    train_loss = binary_ce(xs.double() * w + b, train_y)
    best = int(train_loss.argmin())
    latent = int(pick[best])
    test_loss = binary_ce((test_x[:, latent].double() * w[best] + b[best])[:, None], test_y)
    rate = train_y.mean().clamp(1e-6, 1 - 1e-6)
    base = binary_ce(torch.log(rate / (1 - rate)).expand(test_y.shape[0], 1), test_y)
    return ProbeFit(latent, float(test_loss), float(train_loss[best]), float(base))


class LogisticFit(NamedTuple):
    """Logistic regressions sharing their inputs: p(y_c = 1) = sigmoid(x w_c + b_c)."""

    w: Tensor  # [m, c] float64
    b: Tensor  # [c] float64

    def logits(self, x: Tensor) -> Tensor:
        """x: [N, m] -> [N, c]."""
        return x.double() @ self.w + self.b


def fit_logistic(
    x: Tensor, y: Tensor, l2: float = 1e-3, balanced: bool = True, iters: int = 200
) -> LogisticFit:
    """c independent logistic regressions on the same m features, fitted jointly by L-BFGS.

    x: [N, m] (scale the columns comparably: the ridge l2 on w is one number); y: [N, c] in
    {0, 1}. balanced: each task's positives and negatives weigh half the loss each (sklearn's
    class_weight="balanced", as SAEBench's probes use), so a rare class is not ignored.
    """
    # Autograd runs here whatever the caller's mode (inference_mode included): the inputs are
    # copied into ordinary tensors first.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.double().clone(), y.double().clone()
        if balanced:
            pos = y.sum(0).clamp_min(1)
            neg = (1 - y).sum(0).clamp_min(1)
            weight = y * (x.shape[0] / (2 * pos)) + (1 - y) * (x.shape[0] / (2 * neg))
        else:
            weight = torch.ones_like(y)
        w = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [w, b], max_iter=iters, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            opt.zero_grad()
            z = x @ w + b
            loss = (weight * (F.softplus(z) - y * z)).mean(0).sum() + 0.5 * l2 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return LogisticFit(w.detach(), b.detach())


def balanced_accuracy(predicted: Tensor, y: Tensor) -> float:
    """Mean of the true-positive and true-negative rates (a class that is absent counts 0.5):
    the accuracy on a class-balanced test set. predicted, y: [N] bool."""
    rates = [
        float((predicted[y == cls] == cls).double().mean()) if bool((y == cls).any()) else 0.5
        for cls in (True, False)
    ]
    return sum(rates) / 2


def f1_score(predicted: Tensor, y: Tensor) -> float:
    """F1 of binary predictions against labels, both [N] bool; 0 when there is no positive."""
    tp = int((predicted & y).sum())
    denominator = int(predicted.sum()) + int(y.sum())
    return 2 * tp / denominator if denominator else 0.0
