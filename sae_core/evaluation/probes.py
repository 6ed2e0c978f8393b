"""Probe loss of an SAE: per binary task, the best single-latent 1-D logistic probe.

Following Gao et al. (section 4.3), a latent's feature is its encoder pre-activation (before
TopK: every latent has a value on every token). Sequence-level tasks use its mean over the
context; token-level tasks use it at the token. Tasks and the split are described in
`sae_core.evaluation.probe_data`; the fit in `sae_core.evaluation.metrics.best_single_latent_probe`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from sae_core.evaluation.metrics import best_single_latent_probe, standardize
from sae_core.evaluation.probe_data import MIN_POSITIVES, POS_CLASSES, ProbeSet
from sae_core.sae import SparseAutoencoder


class ProbeResult(NamedTuple):
    task: str  # e.g. "genre=news", "pos=noun"
    level: str  # "sequence" or "token"
    latent: int
    loss: float  # held-out cross-entropy of the best latent's probe (nats)
    baseline_loss: float  # held-out cross-entropy of the training base rate
    positives: int  # positives over both halves


def preactivations(sae: SparseAutoencoder, x: Tensor, chunk: int = 4096) -> Tensor:
    """Encoder pre-activations of raw activations. x: [N, d] -> [N, n] float32."""
    out = torch.empty(x.shape[0], sae.n_latents)
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            x_norm, _ = sae.norm.apply(x[start : start + chunk].float())
            out[start : start + chunk] = sae.preacts(x_norm).cpu()
    sae.free_buffer()
    return out


def _mean_pooled(sae: SparseAutoencoder, acts: Tensor, contexts_per_chunk: int = 64) -> Tensor:
    """acts: [C, P, d] -> [C, n], each latent's mean pre-activation over a context."""
    C, P, d = acts.shape
    out = torch.empty(C, sae.n_latents)
    for start in range(0, C, contexts_per_chunk):
        part = acts[start : start + contexts_per_chunk]
        out[start : start + part.shape[0]] = (
            preactivations(sae, part.reshape(-1, d)).reshape(part.shape[0], P, -1).mean(dim=1)
        )
    return out


def _enough(y: Tensor, train: Tensor) -> bool:
    """Each half has MIN_POSITIVES positives and as many negatives."""
    for half in (train, ~train):
        pos = int(y[half].sum())
        if pos < MIN_POSITIVES or int(half.sum()) - pos < MIN_POSITIVES:
            return False
    return True


def _fit_level(
    level: str, tasks: dict[str, Tensor], x: Tensor, train: Tensor, candidates: int
) -> list[ProbeResult]:
    """The tasks of one level share features x [N, n] and the split train [N]."""
    kept = {name: y for name, y in tasks.items() if _enough(y, train)}
    if not kept:
        return []
    fit_x, test_x = standardize(x[train], x[~train])
    results = []
    for name, y in kept.items():
        fit = best_single_latent_probe(fit_x, y[train], test_x, y[~train], candidates)
        results.append(
            ProbeResult(name, level, fit.latent, fit.loss, fit.baseline_loss, int(y.sum()))
        )
    return results


def evaluate_probes(
    sae: SparseAutoencoder, ps: ProbeSet, candidates: int = 64
) -> list[ProbeResult]:
    """Every task the probe set supports (none when its corpus carries no labels).

    Cost: the encoder GEMM over the probe set's tokens, then Newton fits on `candidates`
    latents per task.
    """
    results: list[ProbeResult] = []
    if ps.genres:
        tasks = {f"genre={g}": (ps.genre == i).double() for i, g in enumerate(ps.genres)}
        results += _fit_level("sequence", tasks, _mean_pooled(sae, ps.acts), ps.train, candidates)
    if ps.token_sample.shape[0]:
        c, p = ps.token_sample[:, 0], ps.token_sample[:, 1]
        labels = ps.pos[c, p]
        tasks = {f"pos={name}": (labels == i).double() for i, name in enumerate(POS_CLASSES)}
        feats = preactivations(sae, ps.acts[c, p])
        results += _fit_level("token", tasks, feats, ps.train[c], candidates)
    return results


def probe_summary(results: list[ProbeResult]) -> dict[str, float]:
    """probe_loss: mean over tasks (and per level), with the base-rate loss of the same tasks
    for scale; empty when there were no tasks."""
    if not results:
        return {}
    out = {
        "probe_loss": sum(r.loss for r in results) / len(results),
        "probe_baseline_loss": sum(r.baseline_loss for r in results) / len(results),
    }
    for level in ("sequence", "token"):
        chosen = [r.loss for r in results if r.level == level]
        if chosen:
            out[f"probe_loss_{level}"] = sum(chosen) / len(chosen)
    return out
