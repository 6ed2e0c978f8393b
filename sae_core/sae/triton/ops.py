"""The TopK step's sparse ops on the Triton kernels, under autograd: what `sae_core.sae.kernels`
and the expander call when the Triton path applies (`kernels.triton_for`).

Each op's forward and backward are kernels of this package; both are deterministic (see
`latent_sums` for the weight gradients). Inputs may be bfloat16 or float16 (e.g. a bf16 copy of
the weights): the kernels accumulate in float32 and return float32 values and gradients, each
gradient cast to its input's dtype, so float32 master weights get float32 gradients.
"""

from __future__ import annotations

import torch

from .compact import compact_decode, compact_dots
from .gather import gather_dots, gather_sum
from .latent_sums import by_latent, latent_sums


class _SparseDecode(torch.autograd.Function):
    """bias + sum_j vals[b, j] W[idx[b, j]] (`gather_sum`); backward `gather_dots` into vals and
    `latent_sums` into W."""

    @staticmethod
    def forward(ctx, idx, vals, W, bias):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(idx, vals, W)
        return gather_sum(idx, vals, W, bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        idx, vals, W = ctx.saved_tensors
        _, need_vals, need_W, need_bias = ctx.needs_input_grad
        d_vals = gather_dots(idx, grad, W).to(vals.dtype) if need_vals else None
        d_W = None
        if need_W:
            d_W = latent_sums(by_latent(idx, W.shape[0]), vals, grad).rows.to(W.dtype)
        d_bias = grad.sum(dim=0) if need_bias else None
        return None, d_vals, d_W, d_bias


def sparse_decode(
    idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """bias + sum_j vals[b, j] W[idx[b, j]]: idx, vals [B, K]; W [n, d]; bias [d] -> [B, d]
    float32. Forward 2 B K d flops; backward 4 B K d flops plus a sort of B K indices."""
    return _SparseDecode.apply(idx, vals, W, bias)


class _SelectedPreacts(torch.autograd.Function):
    """The selected pre-activations (their values from the selection); backward through the K
    selected latents only: d W_enc and d b_enc by `latent_sums`, d x by `gather_sum`."""

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, values, idx):  # noqa: ANN001
        ctx.save_for_backward(x, b_pre, W_enc, idx)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, b_pre, W_enc, idx = ctx.saved_tensors
        need_x, need_b_pre, need_w, need_b = ctx.needs_input_grad[:4]
        sums = latent_sums(by_latent(idx, W_enc.shape[0]), grad, x - b_pre, with_sums=True)
        d_b_enc = sums.coef_sums
        # d pre / d b_pre = -W_enc[idx], summed over the selected entries: -(d_b_enc @ W_enc).
        d_b_pre = -(d_b_enc.to(W_enc.dtype) @ W_enc) if need_b_pre else None
        d_x = gather_sum(idx, grad, W_enc).to(x.dtype) if need_x else None
        d_W = sums.rows.to(W_enc.dtype) if need_w else None
        return d_x, d_b_pre, d_W, (d_b_enc if need_b else None), None, None


def selected_preacts(
    x: torch.Tensor,
    b_pre: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    values: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """values [B, K] (the pre-activations (x - b_pre) W_enc^T + b_enc at idx [B, K]) with
    gradients to x [B, d], b_pre [d], W_enc [n, d] and b_enc [n]. Backward: 4 B K d flops plus
    a sort of B K indices and O(n d) for b_pre."""
    return _SelectedPreacts.apply(x, b_pre, W_enc, b_enc, values, idx)


class _CompactDecode(torch.autograd.Function):
    """The expander's compact decoder (`compact_decode`); backward `compact_dots` into vals and
    `latent_sums` at each latent's columns into values."""

    @staticmethod
    def forward(ctx, idx, vals, rows, values, bias):  # noqa: ANN001
        ctx.save_for_backward(idx, vals, rows, values)
        return compact_decode(idx, vals, rows, values, bias.shape[0], bias)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        idx, vals, rows, values = ctx.saved_tensors
        _, need_vals, _, need_values, need_bias = ctx.needs_input_grad
        d_vals = compact_dots(idx, grad, rows, values).to(vals.dtype) if need_vals else None
        d_values = None
        if need_values:
            groups = by_latent(idx, values.shape[0])
            d_values = latent_sums(groups, vals, grad, cols=rows).rows.to(values.dtype)
        d_bias = grad.sum(dim=0) if need_bias else None
        return None, d_vals, None, d_values, d_bias


def compact_sparse_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """The expander's decoder: idx, vals [B, K]; rows, values [n, degree]; bias [m] -> [B, m]
    float32. Forward and backward O(B K degree) flops (plus the decoder's compares)."""
    return _CompactDecode.apply(idx, vals, rows, values, bias)
