"""The expander's compact decoder: latent l holds `degree` values at fixed output columns
rows[l, :] (distinct), so a token's reconstruction gathers K degree values and places them.

`compact_decode`: out[b, c] = bias[c] + sum_j v[b, j] sum_t values[idx[b, j], t] [rows[idx[b, j], t] == c].
`compact_dots`: the gradient into the activations, d_v[b, j] = sum_t values[l, t] g[b, rows[l, t]]
with l = idx[b, j]. The gradient into `values` is `latent_sums` with cols = rows.

The decoder gathers rather than scatters: each program owns a block of one token's output
columns and compares the token's K degree target columns with them, so every output element
is written once in a fixed order (deterministic, no atomics). The comparisons cost B K degree m
(m the output width), against the step's 2 B m n encoder GEMM a fraction K degree / (2 n): e.g.
0.05% at K = 32, degree = 2, n = 65,536.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import FLOATS, INDICES, checked
from .gather import BLOCK_K

BLOCK_M = 64  # output columns per program


def _degree_block(degree: int) -> int:
    return max(2, triton.next_power_of_2(degree))


@triton.jit
def _compact_decode_kernel(
    idx_ptr, vals_ptr, rows_ptr, values_ptr, bias_ptr, out_ptr, K, m, degree,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < m
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    t = tl.arange(0, BLOCK_T)
    t_ok = t < degree
    for k0 in range(0, K, BLOCK_K):
        slots = k0 + tl.arange(0, BLOCK_K)
        slot_ok = slots < K
        lat = tl.load(idx_ptr + b * K + slots, mask=slot_ok, other=0).to(tl.int64)
        v = tl.load(vals_ptr + b * K + slots, mask=slot_ok, other=0.0).to(tl.float32)
        entry = lat[:, None] * degree + t[None, :]
        ok = slot_ok[:, None] & t_ok[None, :]
        target = tl.load(rows_ptr + entry, mask=ok, other=-1)  # -1: matches no column
        w = tl.load(values_ptr + entry, mask=ok, other=0.0).to(tl.float32)
        contrib = v[:, None] * w  # [BLOCK_K, BLOCK_T]
        hit = target[:, :, None] == cols[None, None, :]
        acc += tl.sum(tl.sum(tl.where(hit, contrib[:, :, None], 0.0), axis=1), axis=0)
    tl.store(out_ptr + b * m + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def compact_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    m: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """bias + sum_j vals[b, j] D[idx[b, j]] for D[l, rows[l, t]] = values[l, t], in float32.

    idx: [B, K] int64/int32 latents < n; vals: [B, K]; rows: [n, degree] int32/int64 columns
    < m, distinct per latent; values: [n, degree]; bias: [m] or None -> [B, m] in out_dtype.
    Cost: 2 B K degree flops plus B K degree m compares (module docstring); memory: reads B K
    latents' rows and values (2 B K degree elements) once per m / BLOCK_M column block, writes
    B m. Grid: one program per (token, column block).
    """
    dev = values.device
    values = checked("compact_decode", "values", values, FLOATS, "[n, degree]", (None, None), dev)
    n, degree = values.shape
    rows = checked("compact_decode", "rows", rows, INDICES, "[n, degree]", (n, degree), dev)
    idx = checked("compact_decode", "idx", idx, INDICES, "[B, K]", (None, None), dev)
    B, K = idx.shape
    vals = checked("compact_decode", "vals", vals, FLOATS, "[B, K]", (B, K), dev)
    if bias is not None:
        bias = checked("compact_decode", "bias", bias, FLOATS, "[m]", (m,), dev)
    out = torch.empty(B, m, dtype=out_dtype, device=dev)
    if B == 0 or m == 0:
        return out
    _compact_decode_kernel[(B, triton.cdiv(m, BLOCK_M))](
        idx, vals, rows, values, values if bias is None else bias, out, K, m, degree,
        HAS_BIAS=bias is not None, BLOCK_K=BLOCK_K, BLOCK_T=_degree_block(degree), BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return out


@triton.jit
def _compact_dots_kernel(
    idx_ptr, g_ptr, rows_ptr, values_ptr, out_ptr, K, m, degree,
    BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot_ok = slots < K
    lat = tl.load(idx_ptr + b * K + slots, mask=slot_ok, other=0).to(tl.int64)
    t = tl.arange(0, BLOCK_T)
    ok = slot_ok[:, None] & (t < degree)[None, :]
    entry = lat[:, None] * degree + t[None, :]
    target = tl.load(rows_ptr + entry, mask=ok, other=0).to(tl.int64)
    w = tl.load(values_ptr + entry, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + b * m + target, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * K + slots, tl.sum(w * g, axis=1), mask=slot_ok)


def compact_dots(
    idx: torch.Tensor, g: torch.Tensor, rows: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """out[b, j] = sum_t values[l, t] g[b, rows[l, t]], l = idx[b, j], in float32.

    idx: [B, K] int64/int32; g: [B, m]; rows: [n, degree] int32/int64; values: [n, degree]
    -> [B, K] float32. Cost: 2 B K degree flops; memory: reads 3 B K degree elements (rows,
    values, g at those columns), writes B K. Grid: one program per (token, slot block).
    """
    dev = values.device
    values = checked("compact_dots", "values", values, FLOATS, "[n, degree]", (None, None), dev)
    n, degree = values.shape
    rows = checked("compact_dots", "rows", rows, INDICES, "[n, degree]", (n, degree), dev)
    idx = checked("compact_dots", "idx", idx, INDICES, "[B, K]", (None, None), dev)
    B, K = idx.shape
    g = checked("compact_dots", "g", g, FLOATS, "[B, m]", (B, None), dev)
    out = torch.empty(B, K, dtype=torch.float32, device=dev)
    if B == 0 or K == 0:
        return out
    _compact_dots_kernel[(B, triton.cdiv(K, BLOCK_K))](
        idx, g, rows, values, out, K, g.shape[1], degree,
        BLOCK_K=BLOCK_K, BLOCK_T=_degree_block(degree),
    )  # fmt: skip
    return out
