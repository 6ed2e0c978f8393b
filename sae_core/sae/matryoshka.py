"""Matryoshka SAEs (Bussmann et al., 2025; Nabeshima, 2024): a TopK SAE trained so that each
prefix of its dictionary, latents [0, s_p) for the sizes s_1 < ... < s_P = n of
sae.matryoshka_prefixes, reconstructs the input alone.

Loss: sum over p of the normalised MSE of x_hat_p = b_pre + sum_{selected i, idx_i < s_p}
a_i W_dec[idx_i], plus AuxK on the full reconstruction's residual. One selection serves every
prefix: BatchTopK over the whole dictionary (its inference threshold as for BatchTopK), or
per-token TopK with sae.batch_topk=false. Early latents must reconstruct with fewer partners,
so broad features settle there and are not absorbed by narrower later ones.

Cost stays O(B K d): the K selected latents of each token are grouped by the prefix they first
belong to, one embedding-bag gathers each (token, group) sum, and a cumulative sum over the P
groups gives every prefix's reconstruction ([B, P, d], P small). No dense decode, no [B, n]
matrix. The native fused loss has no nested terms, so this kind runs the stock ops under
autograd (`kernels.selected_preacts`, embedding_bag), tested against the dense reference.

Weights, inference, the unit-norm decoder and I/O are TopKSAE's; the files differ by format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_core.sae.base import ForwardOutput, Selection, normalized_mse
from sae_core.sae.ranks import Ranks
from sae_core.sae.topk import TopKSAE

FORMAT = "saeflow.matryoshka"


def prefix_groups(idx: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """The first prefix each latent belongs to: idx [B, K] -> [B, K] int64 in [0, P), group p
    for s_{p-1} <= idx < s_p (s_0 = 0)."""
    inner = torch.tensor(sizes[:-1], dtype=idx.dtype, device=idx.device)
    return torch.bucketize(idx.contiguous(), inner, right=True)


def nested_decode(
    idx: Tensor, vals: Tensor, W_dec: Tensor, sizes: tuple[int, ...], bias: Tensor
) -> Tensor:
    """Every prefix's reconstruction: out[b, p] = bias + sum_{i: idx[b, i] < sizes[p]}
    vals[b, i] W_dec[idx[b, i]]. idx, vals: [B, K]; W_dec: [n, d]; bias: [d] -> [B, P, d].

    Each token's slots are sorted by group (a [B, K] sort), one embedding-bag with a bag per
    (token, group) sums them (B K d multiply-adds each way under autograd; empty bags are 0),
    and a cumulative sum over the groups nests them (B P d)."""
    B, P = idx.shape[0], len(sizes)
    groups, order = prefix_groups(idx, sizes).sort(dim=1, stable=True)
    bags = groups + P * torch.arange(B, device=idx.device).unsqueeze(1)  # ascending row-major
    counts = torch.bincount(bags.reshape(-1), minlength=B * P)
    offsets = torch.cumsum(counts, 0) - counts
    parts = F.embedding_bag(
        idx.gather(1, order).reshape(-1),
        W_dec,
        offsets,
        mode="sum",
        per_sample_weights=vals.gather(1, order).reshape(-1).to(W_dec.dtype),
    )
    return parts.view(B, P, -1).cumsum(dim=1) + bias


def dense_nested_decode(
    idx: Tensor, vals: Tensor, W_dec: Tensor, sizes: tuple[int, ...], bias: Tensor
) -> Tensor:
    """The reference for `nested_decode`, by the definition: the [B, n] code matrix truncated to
    each prefix times the decoder's first rows (2 B s_p d flops per prefix)."""
    z = vals.new_zeros(idx.shape[0], W_dec.shape[0]).scatter_add(1, idx, vals)
    return torch.stack([z[:, :s] @ W_dec[:s] + bias for s in sizes], dim=1)


class MatryoshkaSAE(TopKSAE):
    """A TopK SAE (BatchTopK by default) whose prefixes sae.matryoshka_prefixes each reconstruct
    alone; `sizes` holds them in latents, the last n."""

    FORMAT = FORMAT
    KIND = "matryoshka"

    def init_weights(self, generator: torch.Generator | None) -> None:
        self.sizes = self.cfg.prefix_sizes()
        super().init_weights(generator)

    def fused_losses(
        self, x: Tensor, sel: Selection, ranks: Ranks, with_recon: bool, centred: bool
    ) -> ForwardOutput | None:
        """None: the native fused loss makes one reconstruction, not the nested ones."""
        return None

    def reconstruction_terms(
        self, x: Tensor, goal: Tensor, idx: Tensor, vals: Tensor, ranks: Ranks, dense: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(sum of the prefixes' normalised MSEs, the full dictionary's, its reconstruction)."""
        decode = dense_nested_decode if dense else nested_decode
        recons = decode(idx, vals, self.W_dec, self.sizes, self.b_pre)  # [B, P, d]
        terms = [normalized_mse(goal, recons[:, p], ranks) for p in range(len(self.sizes))]
        return torch.stack(terms).sum(), terms[-1], recons[:, -1]
