"""SAEBench's core metrics (Karvonen et al. 2025, `evals/core`), written here.

On the eval split's activations (the positions the SAE is evaluated on), per token x and its
reconstruction x_hat in raw space:
- explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (1 - FVU: SAEBench's
  corrected formula, not its per-batch legacy one);
- cossim: mean over tokens of cos(x, x_hat);
- l2_ratio: mean over tokens of ||x_hat|| / ||x|| (shrinkage below 1; a token with ||x|| < 1e-4
  divides by 1, as SAEBench does);
- alive_fraction: latents that fire (activation > 0) on at least one token;
- latents_over_1pct, latents_over_10pct: latents firing on more than 1% / 10% of tokens;
- mean_max_decoder_cosine: for each latent, the largest cosine between its decoder direction and
  any other latent's, averaged (SAEBench's average_max_decoder_cosine_sim); max_decoder_cosine:
  the largest of them. Over a seeded sample of `decoder_sample` latents (each compared with all
  n) when n is larger; `decoder_cosine_sample` records how many.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_core.evaluation.metrics import VarianceStats, latent_density
from sae_core.sae import SparseAutoencoder

NORM_FLOOR = 1e-4  # below this ||x||, l2_ratio divides by 1 (SAEBench)


@dataclass
class CoreStats:
    """Streams the token-level core metrics over batches."""

    n_latents: int
    variance: VarianceStats = field(default_factory=VarianceStats)
    cos_sum: float = 0.0
    ratio_sum: float = 0.0
    fire_counts: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.long)

    def update(self, x: Tensor, x_hat: Tensor, idx: Tensor, vals: Tensor) -> None:
        """x, x_hat: [N, d] raw; idx, vals: [N, w] the codes (a latent fires when its value > 0)."""
        x, x_hat = x.double(), x_hat.double()
        self.variance.update(x, x_hat)
        self.cos_sum += float(F.cosine_similarity(x, x_hat, dim=-1, eps=1e-12).sum())
        norm = x.norm(dim=-1)
        norm = torch.where(norm < NORM_FLOOR, torch.ones_like(norm), norm)
        self.ratio_sum += float((x_hat.norm(dim=-1) / norm).sum())
        fired = vals > 0
        self.fire_counts += torch.bincount(idx[fired].cpu(), minlength=self.n_latents)

    def result(self) -> dict[str, float]:
        tokens = self.variance.tokens
        density = latent_density(self.fire_counts, tokens)
        return {
            "explained_variance": 1.0 - self.variance.result(),
            "cossim": self.cos_sum / tokens,
            "l2_ratio": self.ratio_sum / tokens,
            "alive_fraction": float((density > 0).double().mean()),
            "latents_over_1pct": float((density > 0.01).double().mean()),
            "latents_over_10pct": float((density > 0.1).double().mean()),
        }


def max_decoder_cosines(decoder: Tensor, sample: int, seed: int = 0, chunk: int = 1024) -> Tensor:
    """Each sampled latent's largest cosine with any other latent's decoder direction.

    decoder: [n, d] -> [min(n, sample)] float32, the latents drawn by a seeded permutation when
    n > sample. Cost: 2 min(n, sample) n d flops, in chunks of `chunk` rows ([chunk, n] at once).
    """
    unit = F.normalize(decoder.float(), dim=-1)
    n = unit.shape[0]
    rows = torch.arange(n)
    if n > sample:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:sample]
    out = torch.empty(rows.shape[0])
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        sims = unit[part] @ unit.T
        sims[torch.arange(part.shape[0]), part] = -float("inf")  # not with itself
        out[start : start + part.shape[0]] = sims.max(dim=1).values
    return out


def decoder_metrics(sae: SparseAutoencoder, sample: int, seed: int = 0) -> dict[str, float]:
    """mean_max_decoder_cosine, max_decoder_cosine and decoder_cosine_sample (see the module)."""
    if sae.n_latents < 2:
        return {}
    with torch.no_grad():
        cosines = max_decoder_cosines(sae.dense_decoder().detach().cpu(), sample, seed)
    return {
        "mean_max_decoder_cosine": float(cosines.mean()),
        "max_decoder_cosine": float(cosines.max()),
        "decoder_cosine_sample": float(cosines.shape[0]),
    }


def core_metrics(
    sae: SparseAutoencoder, acts: Tensor, decoder_sample: int, seed: int = 0, batch: int = 4096
) -> dict[str, float]:
    """The core metrics of `sae` on raw activations acts: [N, d] (see the module)."""
    stats = CoreStats(sae.n_latents)
    device = sae.b_pre.device
    for start in range(0, acts.shape[0], batch):
        x = acts[start : start + batch].to(device).float()
        codes = sae.encode(x)
        stats.update(x, sae.decode(*codes), codes.idx, codes.vals)
    return stats.result() | decoder_metrics(sae, decoder_sample, seed)
