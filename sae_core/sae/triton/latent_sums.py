"""The weight gradients of selected latents, as per-latent sums over the entries that chose them.

For entries e = (b, j) with latent idx[b, j] and coefficient coef[b, j]:
    out[l] = sum over entries with idx == l of coef[e] * src[b]        ([n, d], or [n, degree])
    coef_sum[l] = sum over those entries of coef[e]                   ([n])
That is the decoder's weight gradient (coef = activation, src = the output gradient), the
encoder's (coef = d loss / d pre-activation, src = x - b_pre) with b_enc's as coef_sum, and the
expander's compact values (src read only at each latent's `degree` columns).

A deterministic sorted formulation, not an atomic scatter-add: the entries are grouped by latent
once (a stable sort of the B K indices: torch's radix sort, deterministic), then one program per
(latent, column block) sums its latent's entries in ascending e. Every output element is written
once, by one program, in a fixed order, so the gradients are the same bits run after run, as the
CPU kernels' are; atomics would add in arrival order. The price: a latent chosen by many tokens
is one long program (work per program ~ its count, imbalanced), and the sort.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .checks import FLOATS, INDICES, checked
from .gather import _block

BLOCK_E = 16  # entries per step: a [BLOCK_E, BLOCK_D] tile of gathered src rows


class ByLatent(NamedTuple):
    """The entries of idx [B, K] grouped by latent (stable: ascending entry within a latent)."""

    order: torch.Tensor  # [B K] int64: the entries (b K + j) in latent order
    tokens: torch.Tensor  # [B K] int32: order's tokens b
    crow: torch.Tensor  # [n + 1] int64: latent l's entries are order[crow[l] : crow[l + 1]]


def by_latent(idx: torch.Tensor, n: int) -> ByLatent:
    """Group idx [B, K] (latents < n) by latent. Cost: a sort of B K keys, a count, a scan."""
    K = idx.shape[1]
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(torch.bincount(flat, minlength=n), 0, out=crow[1:])
    tokens = torch.div(order, max(K, 1), rounding_mode="floor").to(torch.int32)
    return ByLatent(order, tokens, crow)


@triton.jit
def _latent_sums_kernel(
    tokens_ptr, coef_ptr, crow_ptr, src_ptr, cols_ptr, out_ptr, sums_ptr, m, width,
    HAS_COLS: tl.constexpr, WITH_SUMS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    lat = tl.program_id(0).to(tl.int64)
    outs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # this program's output columns
    out_ok = outs < width
    if HAS_COLS:  # the latent's own columns of src
        cols = tl.load(cols_ptr + lat * width + outs, mask=out_ok, other=0).to(tl.int64)
    else:
        cols = outs.to(tl.int64)
    start = tl.load(crow_ptr + lat)
    end = tl.load(crow_ptr + lat + 1)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    coef_acc = tl.zeros([BLOCK_E], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        e_ok = es < end
        # Entries past the latent's: token 0 (in bounds) times a coefficient of 0, so c's mask
        # carries the entry mask.
        tok = tl.load(tokens_ptr + es, mask=e_ok, other=0).to(tl.int64)
        c = tl.load(coef_ptr + es, mask=e_ok, other=0.0).to(tl.float32)
        s = tl.load(src_ptr + tok[:, None] * m + cols[None, :], mask=out_ok[None, :], other=0.0)
        s = s.to(tl.float32)
        acc += tl.sum(c[:, None] * s, axis=0)
        coef_acc += c
    tl.store(out_ptr + lat * width + outs, acc, mask=out_ok)
    if WITH_SUMS:
        if tl.program_id(1) == 0:
            tl.store(sums_ptr + lat, tl.sum(coef_acc, axis=0))


class LatentSums(NamedTuple):
    """Per-latent sums of the entries that chose each latent (float32)."""

    rows: torch.Tensor  # [n, width]: sum of coef * src[b] (at the latent's columns with `cols`)
    coef_sums: torch.Tensor | None  # [n]: sum of coef; None unless asked for


def latent_sums(
    groups: ByLatent,
    coef: torch.Tensor,
    src: torch.Tensor,
    cols: torch.Tensor | None = None,
    with_sums: bool = False,
) -> LatentSums:
    """The per-latent sums of the module docstring, in float32, deterministic.

    groups: `by_latent(idx, n)` of idx [B, K]; coef: [B, K]; src: [B, m]; cols: None (width = m:
    out[l] = sum coef src[b]) or [n, degree] int32/int64 (width = degree: out[l, t] = sum coef
    src[b, cols[l, t]]). Cost: 2 B K width flops plus the grouping's sort; memory: reads B K rows
    of src (gathered, `width` elements each) and the B K entries once per column block, writes
    n width once (latents no entry chose get 0). Grid: one program per (latent, column block).
    """
    dev = src.device
    n = groups.crow.shape[0] - 1
    E = groups.order.shape[0]
    coef = checked("latent_sums", "coef", coef, FLOATS, "[B, K]", (None, None), dev)
    if coef.numel() != E:
        raise ValueError(
            f"latent_sums: coef must have the grouped idx's {E} entries; got {coef.numel()}"
        )
    src = checked("latent_sums", "src", src, FLOATS, "[B, m]", (None, None), dev)
    m = src.shape[1]
    if cols is not None:
        cols = checked("latent_sums", "cols", cols, INDICES, "[n, degree]", (n, None), dev)
    width = m if cols is None else cols.shape[1]
    out = torch.empty(n, width, dtype=torch.float32, device=dev)
    sums = torch.empty(n, dtype=torch.float32, device=dev) if with_sums else None
    if n == 0:
        return LatentSums(out, sums)
    # The coefficients in latent order: one gather of B K, so the kernel reads them in sequence.
    sorted_coef = coef.reshape(-1)[groups.order]
    block_c = _block(width, 128)
    _latent_sums_kernel[(n, triton.cdiv(width, block_c) if width else 1)](
        groups.tokens, sorted_coef, groups.crow, src, out if cols is None else cols, out,
        out if sums is None else sums, m, width,
        HAS_COLS=cols is not None, WITH_SUMS=with_sums, BLOCK_E=BLOCK_E, BLOCK_C=block_c,
    )  # fmt: skip
    return LatentSums(out, sums)
