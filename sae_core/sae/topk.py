"""The TopK sparse autoencoder of Gao et al. (2024): dense encoder and decoder, unit-norm rows.

z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)), x_hat = W_dec^T z + b_pre, on normalised x.
Weights are latent-major: W_enc, W_dec: [n, d]; decoder row j (the paper's column j) is the
unit-norm direction of latent j. Selection, the loss, the codec and I/O: `sae_core.sae.base`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_core.sae import fused_loss, kernels
from sae_core.sae.base import ForwardOutput, Selection, SparseAutoencoder
from sae_core.sae.ranks import Ranks

FORMAT = "saeflow.topk"


class TopKSAE(SparseAutoencoder):
    """TopK SAE of width d with cfg.n_latents latents, k of them active per token (BatchTopK:
    k per token on average over a training batch, a learned threshold at inference)."""

    FORMAT = FORMAT
    KIND = "topk"

    def init_weights(self, generator: torch.Generator | None) -> None:
        W = torch.randn(self.n_latents, self.d, generator=generator)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.clone())  # tied at initialisation only

    def encoder_matrix(self) -> torch.Tensor:
        return self.W_enc

    def dense_decoder(self) -> torch.Tensor:
        return self.W_dec

    def selected_preacts(
        self, x: torch.Tensor, pre: torch.Tensor, idx: torch.Tensor, dense: bool = False
    ) -> torch.Tensor:
        """Sparse backward: B K d for d W_enc plus O(n d) (`kernels.selected_preacts`)."""
        return kernels.selected_preacts(x, self.b_pre, self.W_enc, self.b_enc, pre, idx, dense)

    def sparse_decode(
        self, idx: Tensor, vals: Tensor, bias: Tensor | None = None, dense: bool = False
    ) -> Tensor:
        """B K d flops each way (`kernels.sparse_decode`)."""
        return kernels.sparse_decode(idx, vals, self.W_dec, bias, dense)

    def fused_losses(
        self, x: Tensor, sel: Selection, ranks: Ranks, with_recon: bool, centred: bool
    ) -> ForwardOutput | None:
        """`losses` in the native fused kernels (CPU float32; O(B K d) sparse, two passes):
        with_recon=False spares them writing the reconstruction, which training does not read.
        None elsewhere, where `losses` runs stock ops under autograd."""
        if not fused_loss.fused_available(x, self.W_dec, self.W_enc):
            return None
        k = sel.idx.shape[1] if self.cfg.batch_topk else self.k
        use_aux = sel.aux_idx.shape[1] > 0
        terms = fused_loss.fused_losses(
            x,
            self.b_pre,
            self.W_enc,
            self.b_enc,
            self.W_dec,
            torch.cat([sel.idx, sel.aux_idx], dim=1) if use_aux else sel.idx,
            torch.cat([sel.pre, sel.aux_pre], dim=1) if use_aux else sel.pre,
            k,
            sel.idx.shape[1],
            self.cfg.aux_alpha,
            ranks,
            with_recon,
            centred,
        )
        return ForwardOutput(
            sel.idx[:, :k],
            torch.relu(sel.pre[:, :k]),
            terms.recon,
            terms.loss,
            terms.nmse,
            terms.aux_loss,
            sel.aux_idx,
        )

    # Unit-norm decoder -----------------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along the row (before the step)."""
        if self.W_dec.grad is not None:
            kernels.project_rows_(self.W_dec, self.W_dec.grad)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (after the step)."""
        kernels.normalize_rows_(self.W_dec)

    @torch.no_grad()
    def unit_decoder_keeping_codes_(self) -> None:
        """Each latent's decoder norm moves into its encoder row and bias: its activation grows
        by the norm the direction loses, so a token coded by the same latents reconstructs the
        same (the selection can change where the norms differ)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[:, None])
        self.b_enc.mul_(norms)

    def unit_row_decoder(self) -> nn.Parameter:
        return self.W_dec
