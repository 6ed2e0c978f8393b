"""Ablation sparsity on a sample: remove one active latent at one token, score the logit change.

For a sampled eval token at position p, every latent active there is ablated in turn: the
hook's activation at p becomes x - (x_hat - x_hat without that latent), i.e. the latent's
decoded contribution is subtracted from the clean activation (the SAE's error term stays, so
only the latent's own effect is measured). The logits at positions p .. p + horizon - 1 are
compared with the unablated run and scored by `metrics.ablation_sparsity`. The context is cut
after p + horizon - 1 (causal: later tokens cannot matter), and only the horizon's logits are
unembedded.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_core.evaluation.baseline import Baseline
from sae_core.evaluation.metrics import ablation_sparsity
from sae_core.evaluation.splice import SplitModel
from sae_core.sae import SparseAutoencoder


def latent_contributions(sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """x: [d] raw -> (latents [m], contributions [m, d]): each active latent's share of x_hat
    in raw space, x_hat - decode(codes without that latent)."""
    codes = sae.encode(x[None])
    active = codes.vals[0] > 0
    idx, vals = codes.idx[0][active], codes.vals[0][active]
    m = idx.numel()
    # Row r of `dropped` is the code with latent r removed.
    dropped = vals.expand(m, m).clone()
    dropped.fill_diagonal_(0)
    full = sae.decode(codes.idx, codes.vals, codes.stats)
    without = sae.decode(idx.expand(m, m), dropped, codes.stats)
    return idx, full - without


def sample_ablation_sparsity(
    split: SplitModel,
    sae: SparseAutoencoder,
    contexts: Tensor,
    baseline: Baseline,
    first_position: int,
    samples: int,
    horizon: int,
    seed: int = 0,
    progress: bool = True,
) -> Tensor:
    """Ablation sparsity of `samples` single-latent ablations: [samples] (fewer if the eval set
    runs out). Tokens are drawn in a seeded order from positions first_position ..
    T - horizon; all latents active at a drawn token are ablated together in one batch.

    Cost per token: the part above the hook over (m + 1) x (p + horizon) tokens, m = active latents.
    """
    C, T = contexts.shape
    last = T - horizon
    if last < first_position:
        raise ValueError(f"horizon {horizon} leaves no position to ablate in contexts of {T}")
    device = next(split.model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(C * (last - first_position + 1), generator=g)
    results: list[Tensor] = []
    done = 0
    bar = tqdm(total=samples, desc="ablation sparsity", unit="ablation", disable=not progress)
    with torch.inference_mode():
        for flat in order.tolist():
            if done >= samples:
                break
            c, p = divmod(flat, last - first_position + 1)
            p += first_position
            act = baseline.act[c, : p + horizon].to(device)
            latents, contrib = latent_contributions(sae, act[p])
            m = min(latents.numel(), samples - done)
            if m == 0:
                continue
            rows = act.expand(m + 1, *act.shape).clone()
            rows[1:, p] -= contrib[:m].to(rows.dtype)
            ids = contexts[c, : p + horizon].to(device).expand(m + 1, -1)
            feed = None
            if baseline.block_input is not None:
                feed = baseline.block_input[c, : p + horizon].to(device).expand(m + 1, -1, -1)
            logits = split.logits(ids, rows, feed, keep=horizon)
            results.append(ablation_sparsity(logits[1:] - logits[:1]))
            done += m
            bar.update(m)
    bar.close()
    return torch.cat(results) if results else torch.zeros(0, dtype=torch.float64)
