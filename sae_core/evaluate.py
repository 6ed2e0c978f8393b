"""Evaluate a trained SAE on the eval split: reconstruction and downstream next-token loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from sae_core.metrics import DownstreamStats, ReconstructionStats, next_token_ce
from sae_core.models import forward_with_replacement
from sae_core.refs import DatasetRef
from sae_core.sae import TopKSAE


class EvalResult(NamedTuple):
    metrics: dict[str, float]
    latent_fire_counts: list[int]


def load_eval_contexts(tokens: DatasetRef) -> torch.Tensor:
    """The eval split's token contexts: [C, T] int64."""
    with tokens.open_store().open(f"{tokens.path}/eval.parquet") as fh:
        column = pq.read_table(fh, columns=["tokens"]).column("tokens")
    return torch.from_numpy(np.stack(column.to_numpy(zero_copy_only=False)).astype(np.int64))


def evaluate_sae(
    sae: TopKSAE,
    model: torch.nn.Module,
    tokens: DatasetRef,
    hook: str,
    batch_contexts: int,
    first_position: int,
    progress: bool = True,
) -> EvalResult:
    """Splice the SAE's reconstruction into the model at `hook` and measure what it costs.

    Positions < first_position keep their clean activations in every variant (they are outside
    the SAE's training distribution, e.g. the attention sink at position 0).
    Cost per batch: three forward passes of the model (clean, spliced, zero-ablated).
    """
    contexts = load_eval_contexts(tokens)
    device = next(model.parameters()).device
    sae = sae.to(device).eval()
    recon = ReconstructionStats(sae.n_latents)
    downstream = DownstreamStats()

    def replace_tail(
        fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        def replace(h: torch.Tensor) -> torch.Tensor:
            out = h.clone()
            out[:, first_position:] = fn(h[:, first_position:])
            return out

        return replace

    def splice(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1]).float()
        codes = sae.encode(flat)
        x_hat = sae.decode(*codes)
        recon.update(flat, x_hat, codes.idx, codes.vals)
        return x_hat.reshape(h.shape).to(h.dtype)

    variants: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
        "clean": None,
        "spliced": replace_tail(splice),
        "zero": replace_tail(torch.zeros_like),
    }
    batches = range(0, contexts.shape[0], batch_contexts)
    with torch.inference_mode():
        for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
            ids = contexts[start : start + batch_contexts].to(device)
            terms = ids.shape[0] * (ids.shape[1] - 1 - first_position)
            for name, replace in variants.items():
                logits = forward_with_replacement(model, ids, hook, replace)
                downstream.update(name, next_token_ce(logits, ids, first_position), terms)
    metrics = recon.result() | downstream.result()
    return EvalResult(metrics=metrics, latent_fire_counts=recon.fire_counts.tolist())
