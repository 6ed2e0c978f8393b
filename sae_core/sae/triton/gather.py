"""The TopK decoder's gathers: a gather-sum of selected rows (`gather_sum`) and the dot products
of a token's row with its selected rows (`gather_dots`).

`gather_sum` is the decoder, x_hat[b] = bias + sum_j v[b, j] W_dec[idx[b, j]], and the encoder's
input gradient through the selected latents, d_x[b] = sum_j dpre[b, j] W_enc[idx[b, j]].
`gather_dots` is the decoder's gradient into the values, d_v[b, j] = <g[b], W_dec[idx[b, j]]>.
Both read only the K selected rows per token; each output element is one program's fixed
reduction order, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOATS, INDICES, checked

BLOCK_K = 16  # slots per step: a [BLOCK_K, BLOCK_D] tile of gathered rows


def _block(size: int, cap: int) -> int:
    """The tile width for `size` elements: a power of two, at least 16, at most cap."""
    return max(16, min(cap, triton.next_power_of_2(size)))


@triton.jit
def _gather_sum_kernel(
    idx_ptr, vals_ptr, W_ptr, bias_ptr, out_ptr, K, d,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for k0 in range(0, K, BLOCK_K):
        slots = k0 + tl.arange(0, BLOCK_K)
        slot_ok = slots < K
        # Slots past K: row 0 (in bounds) times a value of 0, so v's mask carries the slot mask.
        rows = tl.load(idx_ptr + b * K + slots, mask=slot_ok, other=0).to(tl.int64)
        v = tl.load(vals_ptr + b * K + slots, mask=slot_ok, other=0.0).to(tl.float32)
        w = tl.load(W_ptr + rows[:, None] * d + cols[None, :], mask=col_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        acc += tl.sum(v[:, None] * w, axis=0)
    tl.store(out_ptr + b * d + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def gather_sum(
    idx: torch.Tensor,
    vals: torch.Tensor,
    W: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """out[b] = bias + sum_j vals[b, j] W[idx[b, j]], accumulated in float32.

    idx: [B, K] int64/int32 rows < n; vals: [B, K]; W: [n, d]; bias: [d] or None -> [B, d] in
    out_dtype. Floats may be float32, bfloat16 or float16. Cost: 2 B K d flops; memory: reads
    B K rows of W (B K d elements, gathered: L2 hits where latents repeat) plus idx and vals
    once per d / BLOCK_D column block, writes B d. Grid: one program per (token, column block).
    """
    dev = W.device
    W = checked("gather_sum", "W", W, FLOATS, "[n, d]", (None, None), dev)
    idx = checked("gather_sum", "idx", idx, INDICES, "[B, K]", (None, None), dev)
    B, K = idx.shape
    n, d = W.shape
    vals = checked("gather_sum", "vals", vals, FLOATS, "[B, K]", (B, K), dev)
    if bias is not None:
        bias = checked("gather_sum", "bias", bias, FLOATS, "[d]", (d,), dev)
    out = torch.empty(B, d, dtype=out_dtype, device=dev)
    if B == 0 or d == 0:
        return out
    block_d = _block(d, 128)
    _gather_sum_kernel[(B, triton.cdiv(d, block_d))](
        idx, vals, W, W if bias is None else bias, out, K, d,
        HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K, BLOCK_D=block_d,
    )  # fmt: skip
    return out


@triton.jit
def _gather_dots_kernel(
    idx_ptr, g_ptr, W_ptr, out_ptr, K, d, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr
):
    b = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_ok = slots < K
    rows = tl.load(idx_ptr + b * K + slots, mask=slot_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        g = tl.load(g_ptr + b * d + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(
            W_ptr + rows[:, None] * d + cols[None, :],
            mask=slot_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * g[None, :], axis=1)
    tl.store(out_ptr + b * K + slots, acc, mask=slot_ok)


def gather_dots(idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """out[b, j] = <g[b], W[idx[b, j]]>, accumulated and returned in float32.

    idx: [B, K] int64/int32 rows < n; g: [B, d]; W: [n, d] -> [B, K] float32. Cost: 2 B K d
    flops; memory: reads B K rows of W (gathered) and g once per K / BLOCK_K slot block, writes
    B K. Grid: one program per (token, slot block).
    """
    dev = W.device
    W = checked("gather_dots", "W", W, FLOATS, "[n, d]", (None, None), dev)
    idx = checked("gather_dots", "idx", idx, INDICES, "[B, K]", (None, None), dev)
    B, K = idx.shape
    d = W.shape[1]
    g = checked("gather_dots", "g", g, FLOATS, "[B, d]", (B, d), dev)
    out = torch.empty(B, K, dtype=torch.float32, device=dev)
    if B == 0 or K == 0:
        return out
    _gather_dots_kernel[(B, triton.cdiv(K, BLOCK_K))](
        idx, g, W, out, K, d, BLOCK_K=BLOCK_K, BLOCK_D=_block(d, 128)
    )
    return out
