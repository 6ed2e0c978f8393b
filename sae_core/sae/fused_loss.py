"""The sparse loss of selected latents, forward and backward in native kernels (CPU float32).

Shapes: B tokens, d model width, n latents; idx, pre: [B, K] selected latents and their
pre-activations, slots [0, k) the TopK code, [k, k_main) the rest of the 4k code (multi-TopK),
[k_main, K) AuxK's; W_enc, W_dec: [n, d].

`fused_losses` makes the loss (normalised MSE, + L(4k)/8 with multi-TopK, + aux_alpha times
AuxK's) and its gradients to x, b_pre, W_enc, b_enc and W_dec in two native passes: forward,
one token-major pass over W's 16-column panels (`decode_forward`: the reconstruction, each
term's residual and the dot products <residual, w_i> the backward needs, ~2 B K d MACs, each
gathered decoder line from L2); backward, one latent-major pass (`weight_grads`: d W_dec and
d W_enc at once, 2 B K d MACs) plus O(B K + n d). No [B, K, d] temporary and no dense [B, n]
matrix; the per-token rows the passes share live in a reused [P, S, B, 16] buffer
(`kernels.BUFFERS`). Tested against the dense reference (`TopKSAE.losses(dense=True)`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_core.sae import kernels, native, unit_adam
from sae_core.sae.ranks import SINGLE, Ranks


class LossTerms(NamedTuple):
    """The sparse loss of one batch: loss = nmse (+ L(4k)/8) + aux_alpha * aux_loss."""

    loss: torch.Tensor  # []
    nmse: torch.Tensor  # [] TopK-k normalised MSE
    aux_loss: torch.Tensor  # [] AuxK normalised MSE of the residual (0 without AuxK)
    recon: torch.Tensor | None  # [B, d] TopK-k reconstruction (no gradient); None unless asked


class _FusedLoss(torch.autograd.Function):
    """TopK / multi-TopK / AuxK loss of given selections, forward and backward in native kernels.

    The loss gradient w.r.t. each selected activation is a multiple of <residual, w_i>, which
    the forward computes while the decoder rows are in cache; the backward turns the upstream
    gradients into those multiples and makes one latent-major pass for d W_dec and d W_enc.
    """

    @staticmethod
    def forward(
        ctx, xc, b_pre, W_enc, b_enc, W_dec, idx, pre, k, k_main, aux_alpha, ranks, with_recon
    ):  # noqa: ANN001
        # xc = x - b_pre, without a graph to b_pre: b_pre's gradient is made here, holding x fixed.
        ext = native.load()
        B, d = xc.shape
        acts = pre.clamp_min(0)
        slots = 2 + (k_main > k) + (idx.shape[1] > k_main)  # xc, residuals of the terms present
        # 16-column panels, filled below
        rows = kernels.BUFFERS.take((-(-d // 16), slots, B, 16), xc.device)
        recon, dots, head, sq, colsum = ext.decode_forward(
            xc,
            b_pre,
            W_dec,
            idx,
            acts,
            k,
            k_main,
            with_recon,
            kernels.decode_path(),
            rows,
            unit_adam.packed(W_dec),
        )
        sq = sq.sum(dim=0, dtype=torch.float64)  # |x - b_pre|^2, |r_main|^2, |r_multi|^2, |r_aux|^2
        # [d] each, sums over tokens of r_main, r_multi and x - b_pre
        sum_main, sum_multi, sum_x = colsum.double()
        # Normalisers over the global batch (this rank's terms are its share of the loss). The
        # data's: sum |x - mean|^2 = sum |x - b_pre|^2 - |sum (x - b_pre)|^2 / B.
        tokens = B * ranks.world_size
        sq_x_all, sum_x_all = ranks.sum_(sq[0].clone()), ranks.sum_(sum_x.clone())
        base_x = sq_x_all - sum_x_all.pow(2).sum() / tokens
        if base_x * 16 < sq_x_all:  # b_pre far from the data: the difference lost digits
            base_x = ranks.batch_spread(xc).double()  # shift-invariant
        base_x = base_x.clamp_min(1e-12)
        nmse = sq[1] / base_x
        loss = nmse + sq[2] / base_x / 8  # sq[2] = 0 without multi-TopK
        aux_loss = base_aux = sq.new_zeros(())
        if idx.shape[1] > k_main:
            # The residual x - recon = -r_main, centred: |r_main|^2 summed minus B |mean|^2.
            sq_main, sum_main_all = ranks.sum_(sq[1].clone()), ranks.sum_(sum_main.clone())
            base_aux = sq_main - sum_main_all.pow(2).sum() / tokens
            base_aux = base_aux.clamp_min(1e-12)
            aux_loss = (sq[3] / base_aux).nan_to_num(0.0)
            loss = loss + aux_alpha * aux_loss
        ctx.save_for_backward(b_pre, W_enc, idx, pre, acts, rows, dots, head)
        ctx.consts = (k, k_main, aux_alpha, float(base_x), float(base_aux), sum_main, sum_multi)
        ctx.mark_non_differentiable(recon)
        return loss.float(), nmse.float(), aux_loss.float(), recon

    @staticmethod
    def backward(ctx, g_loss, g_nmse, g_aux, _g_recon):  # noqa: ANN001
        b_pre, W_enc, idx, pre, acts, rows, dots, head = ctx.saved_tensors
        k, k_main, alpha, base_x, base_aux, sum_main, sum_multi = ctx.consts
        d, K, multi = b_pre.shape[0], idx.shape[1], k_main > k
        gl, gn, ga = float(g_loss), float(g_nmse), float(g_aux)
        c_main = 2 * (gl + gn) / base_x  # d loss / d r_main = c_main r_main, and so on
        c_multi = 2 * gl / (8 * base_x)
        c_aux = 2 * (gl * alpha + ga) / base_aux if K > k_main else 0.0
        # The head's gradient with multi-TopK is c_main r_main + c_multi r_multi: written over
        # r_main (rows slot 1), in place (a second backward through this graph then fails
        # autograd's version check instead of going wrong). Each entry's coefficients on these
        # rows and on x are made from the dots inside `weight_grads`.
        r_main = rows[:, 1]  # [P, B, 16] panels
        if multi:
            r_main.mul_(c_main).add_(rows[:, 2], alpha=c_multi)
        ext = native.load()
        d_W_dec, d_W_enc, d_b_enc, dpre = ext.weight_grads(
            idx,
            W_enc.shape[0],
            k,
            k_main,
            rows,
            acts,
            pre,
            dots,
            head,
            c_main,
            c_multi,
            c_aux,
            d,
            ctx.needs_input_grad[0],
        )
        d_b_pre = (c_main * sum_main + c_multi * sum_multi).float() - d_b_enc @ W_enc
        d_x = None
        if ctx.needs_input_grad[0]:  # d loss / d xc = d loss / d x
            direct = r_main if multi else c_main * r_main  # d loss / d x through the target x
            direct = direct.permute(1, 0, 2).reshape(direct.shape[1], -1)[:, :d]  # panels -> [B, d]
            d_x = F.embedding_bag(idx, W_enc, per_sample_weights=dpre, mode="sum") - direct
        return d_x, d_b_pre, d_W_enc, d_b_enc, d_W_dec, None, None, None, None, None, None, None


def fused_available(*tensors: torch.Tensor) -> bool:
    """Whether `fused_losses` can run on these tensors (CPU float32 and a compiled extension),
    and the Triton kernels are not asked to take them (`kernels.TRITON`)."""
    return kernels.native_for(*tensors) is not None and kernels.triton_for(*tensors) is None


def fused_losses(
    x: torch.Tensor,
    b_pre: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    idx: torch.Tensor,
    pre: torch.Tensor,
    k: int,
    k_main: int,
    aux_alpha: float,
    ranks: Ranks = SINGLE,
    with_recon: bool = True,
    centred: bool = False,
) -> LossTerms:
    """The sparse loss of selected latents, gradients to x, b_pre, W_enc, b_enc and W_dec.

    x: [B, d] normalised (centred=True: x - b_pre already, as training's normaliser writes it;
    its graph must not lead to b_pre, whose gradient is made here); idx, pre: [B, K] latents
    and their pre-activations: slots [0, k) the
    TopK code, [k, k_main) the rest of the 4k code (multi-TopK), [k_main, K) AuxK's. Cost:
    forward ~2 B K d MACs (each gathered decoder row read once), backward 2 B K d MACs plus
    O(B K + n d); no [B, K, d] temporary, no dense [B, n] matrix. ranks: x is this rank's
    slice of the batch; the normalisers are the global batch's (one to three all-reduces).
    with_recon=False leaves `recon` out (None): training never reads it.
    """
    xc = x if centred else x - b_pre.detach()
    loss, nmse, aux_loss, recon = _FusedLoss.apply(
        xc.contiguous(),
        b_pre,
        W_enc,
        b_enc,
        W_dec.contiguous(),
        idx.contiguous(),
        pre.contiguous(),
        k,
        k_main,
        aux_alpha,
        ranks,
        with_recon,
    )
    return LossTerms(loss, nmse, aux_loss, recon if with_recon else None)
