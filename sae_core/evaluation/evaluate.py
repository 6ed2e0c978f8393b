"""Evaluate a trained SAE on the eval split: reconstruction, downstream loss, ablation sparsity
and probe loss.

The part of the model below the hook comes from the eval set's `Baseline` (run once, shared by
every SAE and variant); here only the part above it runs: per batch, once with the clean
activation and once with the SAE's reconstruction spliced in, plus the single-latent ablations.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from sae_core import stopping
from sae_core.config import EvalConfig
from sae_core.data.models import HookPoint
from sae_core.evaluation.ablation import sample_ablation_sparsity
from sae_core.evaluation.baseline import Baseline, with_tail
from sae_core.evaluation.metrics import (
    DensityHistogram,
    DownstreamStats,
    ReconstructionStats,
    ce_from_logprobs,
    kl_from_logprobs,
    next_token_logprobs,
)
from sae_core.evaluation.probe_data import ProbeSet
from sae_core.evaluation.probes import ProbeResult, evaluate_probes, probe_summary
from sae_core.evaluation.splice import SplitModel
from sae_core.evaluation.transcode import transcode
from sae_core.sae import SparseAutoencoder
from sae_core.storage.refs import DatasetRef


class EvalResult(NamedTuple):
    metrics: dict[str, float]  # flat figures (what MLflow logs)
    latent_fire_counts: list[int]  # [n] firings over the eval tokens
    density: DensityHistogram
    probes: list[ProbeResult]
    ablation_sparsity: list[float]  # one value per single-latent ablation
    seconds: dict[str, float]  # wall time per phase


class _Clock:
    """Wall time per phase, summed over repeated entries."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - start


def load_eval_contexts(tokens: DatasetRef) -> torch.Tensor:
    """The eval split's token contexts: [C, T] int64."""
    with tokens.open_store().open(f"{tokens.path}/eval.parquet") as fh:
        column = pq.read_table(fh, columns=["tokens"]).column("tokens")
    return torch.from_numpy(np.stack(column.to_numpy(zero_copy_only=False)).astype(np.int64))


def evaluate_sae(
    sae: SparseAutoencoder,
    split: SplitModel,
    contexts: torch.Tensor,
    baseline: Baseline,
    cfg: EvalConfig,
    first_position: int,
    probe_set: ProbeSet | None = None,
    progress: bool = True,
    hook_in: HookPoint | None = None,
) -> EvalResult:
    """contexts: [C, T] (the ones `baseline` was computed on).

    hook_in: a transcoder's input hook (`split` is cut at its output hook): its codes come from
    there and its prediction is spliced in (`sae_core.evaluation.transcode`); the metrics are
    then of the output hook's activation y (nmse, fvu) and of the spliced model, without
    ablation sparsity.

    Positions < first_position keep their clean activations in every variant (they are outside
    the SAE's training distribution, e.g. the attention sink at position 0).
    Cost: the part above the hook twice per batch (clean, spliced), the SAE on every token,
    `cfg.ablation_samples` ablations (see sae_core.evaluation.ablation), the encoder on the probe set.
    """
    clock = _Clock()
    device = next(split.model.parameters()).device
    sae = sae.to(device).eval()
    recon = ReconstructionStats(sae.n_latents)
    downstream = DownstreamStats()
    batches = range(0, contexts.shape[0], cfg.batch_contexts)
    with torch.inference_mode():
        for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
            stopping.check()
            stop = start + cfg.batch_contexts
            ids = contexts[start:stop].to(device)
            act = baseline.act[start:stop].to(device)
            feed = (
                None
                if baseline.block_input is None
                else baseline.block_input[start:stop].to(device)
            )
            terms = ids.shape[0] * (ids.shape[1] - 1 - first_position)
            with clock("lm above hook: clean"):
                clean = split.logits(ids, act, feed)
            with clock("sae: encode+decode"):
                x = act[:, first_position:].reshape(-1, act.shape[-1]).float()
                if hook_in is None:
                    codes = sae.encode(x)
                    x_hat = sae.decode(*codes)
                    shift, scale = codes.stats
                else:
                    codes, x_hat, (shift, scale) = transcode(
                        sae, split.model, ids, hook_in, first_position, x
                    )
                recon.update(
                    x, x_hat, (x - shift) / scale, (x_hat - shift) / scale, codes.idx, codes.vals
                )
            with clock("lm above hook: spliced"):
                tail = x_hat.reshape(act.shape[0], -1, act.shape[-1]).to(act.dtype)
                spliced = split.logits(ids, with_tail(act, first_position, tail), feed)
            with clock("ce and kl on logits"):
                # One log-softmax per variant serves both its CE and the KL.
                clean = next_token_logprobs(clean, first_position)
                spliced = next_token_logprobs(spliced, first_position)
                downstream.add("clean", ce_from_logprobs(clean, ids, first_position), terms)
                downstream.add(
                    "spliced",
                    ce_from_logprobs(spliced, ids, first_position),
                    terms,
                    kl_sum=kl_from_logprobs(clean, spliced),
                )
            del clean, spliced  # [B, T, V] each: free before the next batch allocates
    for name, ce_sum in baseline.ce_sums.items():
        downstream.add(name, ce_sum, baseline.terms)
    metrics = recon.result() | downstream.result()

    sparsity = torch.zeros(0)
    if cfg.ablation_samples and hook_in is None:  # a single latent's ablation needs x itself
        with clock("ablation sparsity"):
            sparsity = sample_ablation_sparsity(
                split,
                sae,
                contexts,
                baseline,
                first_position,
                cfg.ablation_samples,
                cfg.ablation_horizon,
                cfg.seed,
                progress,
            )
        metrics["ablation_sparsity"] = float(sparsity.mean()) if sparsity.numel() else float("nan")
    probes: list[ProbeResult] = []
    if probe_set is not None:
        with clock("probes"):
            probes = evaluate_probes(sae.cpu(), probe_set)
        metrics |= probe_summary(probes)
    return EvalResult(
        metrics=metrics,
        latent_fire_counts=recon.fire_counts.tolist(),
        density=recon.histogram(),
        probes=probes,
        ablation_sparsity=sparsity.tolist(),
        seconds=dict(clock.seconds),
    )
