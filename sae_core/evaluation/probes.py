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


def enough_examples(y: Tensor, train: Tensor) -> bool:
    """Each half has MIN_POSITIVES positives and as many negatives. y, train: [N]."""
    for half in (train, ~train):
        pos = int(y[half].sum())
        if pos < MIN_POSITIVES or int(half.sum()) - pos < MIN_POSITIVES:
            return False
    return True


class TaskLevel(NamedTuple):
    """The binary tasks of one level, sharing their examples and split."""

    level: str  # "sequence" (a context, its genre) or "token" (a token, its word's class)
    tasks: dict[str, Tensor]  # name -> [N] float64 labels in {0, 1}
    train: Tensor  # [N] bool: the example is in the fitting half
    tokens: Tensor | None  # [N, 2] (context, position) of each token example; None: contexts


def task_levels(ps: ProbeSet) -> list[TaskLevel]:
    """Every task the probe set supports, by level (none when its corpus carries no labels)."""
    levels = []
    if ps.genres:
        tasks = {f"genre={g}": (ps.genre == i).double() for i, g in enumerate(ps.genres)}
        levels.append(TaskLevel("sequence", tasks, ps.train, None))
    if ps.token_sample.shape[0]:
        c, p = ps.token_sample[:, 0], ps.token_sample[:, 1]
        labels = ps.pos[c, p]
        tasks = {f"pos={name}": (labels == i).double() for i, name in enumerate(POS_CLASSES)}
        levels.append(TaskLevel("token", tasks, ps.train[c], ps.token_sample))
    return levels


def _fit_level(
    level: str, tasks: dict[str, Tensor], x: Tensor, train: Tensor, candidates: int
) -> list[ProbeResult]:
    """The tasks of one level share features x [N, n] and the split train [N]."""
    kept = {name: y for name, y in tasks.items() if enough_examples(y, train)}
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
    for level in task_levels(ps):
        if level.tokens is None:
            feats = _mean_pooled(sae, ps.acts)
        else:
            feats = preactivations(sae, ps.acts[level.tokens[:, 0], level.tokens[:, 1]])
        results += _fit_level(level.level, level.tasks, feats, level.train, candidates)
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
