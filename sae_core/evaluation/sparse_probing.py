"""SAEBench's k-sparse probing (Karvonen et al. 2025, `evals/sparse_probing`), written here, on
the probe tasks the project already has (sae_core.evaluation.probe_data: Brown genres at the
sequence level, coarse parts of speech at the token level; `probes.task_levels`).

Per binary task and k in `ks`: on the fitting half, the k latents with the largest absolute
difference between the mean activation on positives and on negatives; a logistic regression on
those k latents (standardised, ridge as sklearn's default C = 1, classes balanced); its accuracy
on the other half. Features are the SAE's activations (the sparse codes, zero where a latent did
not fire), mean-pooled over a context's positions for sequence tasks, as SAEBench pools.

Accuracy is balanced accuracy (the mean of the true-positive and true-negative rates): SAEBench
scores balanced test sets, and one-genre-against-the-rest tasks are not balanced here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sae_core.evaluation.metrics import balanced_accuracy, fit_logistic, standardize
from sae_core.evaluation.probe_data import ProbeSet
from sae_core.evaluation.probes import enough_examples, task_levels
from sae_core.sae import SparseAutoencoder

KS = (1, 2, 5, 10, 20)


class SparseProbeResult(NamedTuple):
    task: str  # e.g. "genre=news", "pos=noun"
    level: str  # "sequence" or "token"
    k: int
    accuracy: float  # balanced accuracy on the held-out half
    latents: list[int]  # the k latents, largest mean difference first


def latent_activations(sae: SparseAutoencoder, x: Tensor, chunk: int = 4096) -> Tensor:
    """The SAE's activations of raw x: [N, d] -> [N, n] float32, dense (zero where a latent
    did not fire). Memory: N n floats."""
    out = torch.zeros(x.shape[0], sae.n_latents)
    for start in range(0, x.shape[0], chunk):
        codes = sae.encode(x[start : start + chunk].to(sae.b_pre.device).float())
        out[start : start + chunk].scatter_(1, codes.idx.cpu(), codes.vals.float().cpu())
    return out


def mean_pooled_activations(sae: SparseAutoencoder, acts: Tensor, per_chunk: int = 64) -> Tensor:
    """acts: [C, P, d] -> [C, n], each latent's mean activation over a context's positions."""
    C, P, d = acts.shape
    out = torch.empty(C, sae.n_latents)
    for start in range(0, C, per_chunk):
        part = acts[start : start + per_chunk]
        codes = latent_activations(sae, part.reshape(-1, d))
        out[start : start + part.shape[0]] = codes.reshape(part.shape[0], P, -1).mean(dim=1)
    return out


def top_mean_difference(x: Tensor, y: Tensor, k: int) -> Tensor:
    """The k columns of x [N, n] with the largest |mean over y=1 - mean over y=0|, largest
    first. y: [N] in {0, 1}. Returns [min(k, n)] int64."""
    positive = y.bool()
    gap = x[positive].double().mean(0) - x[~positive].double().mean(0)
    return gap.abs().topk(min(k, x.shape[1])).indices


def probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int
) -> tuple[float, list[int]]:
    """Balanced held-out accuracy of a logistic probe on the top-k mean-difference columns.
    train_x: [N, n], test_x: [M, n]; train_y: [N], test_y: [M] in {0, 1}."""
    chosen = top_mean_difference(train_x, train_y, k)
    fit_x, score_x = standardize(train_x[:, chosen], test_x[:, chosen])
    fit = fit_logistic(fit_x, train_y[:, None], l2=1.0 / train_x.shape[0])
    predicted = fit.logits(score_x)[:, 0] > 0
    return balanced_accuracy(predicted, test_y.bool()), chosen.tolist()


def sparse_probing(
    sae: SparseAutoencoder, ps: ProbeSet, ks: tuple[int, ...] = KS
) -> list[SparseProbeResult]:
    """Every task of the probe set with enough examples (probes.enough_examples), every k.

    Cost: the SAE over the probe set's tokens, then one small logistic fit per task and k.
    """
    results = []
    for level in task_levels(ps):
        if level.tokens is None:
            feats = mean_pooled_activations(sae, ps.acts)
        else:
            feats = latent_activations(sae, ps.acts[level.tokens[:, 0], level.tokens[:, 1]])
        train = level.train
        for name, y in level.tasks.items():
            if not enough_examples(y, train):
                continue
            for k in ks:
                acc, latents = probe_accuracy(feats[train], y[train], feats[~train], y[~train], k)
                results.append(SparseProbeResult(name, level.level, k, acc, latents))
    return results


def sparse_probing_summary(results: list[SparseProbeResult]) -> dict[str, float]:
    """sparse_probe_acc_k{k}: the mean over tasks of the balanced accuracy at k."""
    by_k: dict[int, list[float]] = {}
    for r in results:
        by_k.setdefault(r.k, []).append(r.accuracy)
    return {f"sparse_probe_acc_k{k}": sum(v) / len(v) for k, v in sorted(by_k.items())}
