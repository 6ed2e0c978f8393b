"""The encoder GEMM's operands laid out for tensor cores.

cuBLAS runs a 16-bit (bfloat16, float16) GEMM on tensor cores when every operand's leading
dimension is a multiple of 8 elements (16 bytes); otherwise it may fall back to slower paths.
The encoder's inner dimension is the model width d, which a user's model need not align (d = 577
would not), so 16-bit operands are cast into buffers whose rows are zero-padded to a multiple of
8: the zero columns add nothing to any dot product, so the GEMM's result is unchanged. The cast
copies anyway (float32 master weights, float32 activations), so the padding costs no extra pass.
Float32 operands are left as they are: the CPU's float32 GEMM gains nothing from it.
"""

from __future__ import annotations

import torch

TENSOR_CORE_ELEMENTS = 8
TENSOR_CORE_DTYPES = (torch.bfloat16, torch.float16)


def aligned(cols: int) -> int:
    """cols rounded up to a multiple of TENSOR_CORE_ELEMENTS."""
    return -(-cols // TENSOR_CORE_ELEMENTS) * TENSOR_CORE_ELEMENTS


def aligned_operand(
    t: torch.Tensor, dtype: torch.dtype, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """(t - offset) [r, c] in `dtype`: for a tensor-core dtype, a new [r, aligned(c)] tensor whose
    columns past c are zero; otherwise t - offset as torch computes it, cast. offset: [c] or None."""
    if dtype not in TENSOR_CORE_DTYPES:
        return (t if offset is None else t - offset).to(dtype)
    rows, cols = t.shape
    padded = torch.empty(rows, aligned(cols), dtype=dtype, device=t.device)
    padded[:, cols:].zero_()
    padded[:, :cols].copy_(t if offset is None else t - offset)  # subtracted before rounding
    return padded
