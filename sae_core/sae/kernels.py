"""The kernels of a sparse-aware TopK SAE step, and the dense reference they must equal.

Shapes: B tokens, d model width, n latents, K selected latents per token (k, 4k for
multi-TopK, plus k_aux for AuxK). Weights are stored latent-major: W_enc, W_dec: [n, d].

Only `encoder_preacts` is dense (2 B d n flops). Everything after the selection touches the K
chosen latents per token: the decoder is a gather-sum over them, and the encoder's backward
scatters B K rows of d into its weight gradient, so the step costs about one dense GEMM plus
O(B K d) work instead of the ~6 GEMMs of a dense implementation.

This module holds the step's ops that have both a native CPU kernel (`sae_core.sae.native`, for
CPU float32) and a stock torch path (CUDA, bf16, no compiler): top-k, the encoder GEMM,
per-token normalisation, the sparse encoder backward and decoder, firing counts, and the
unit-norm decoder's row ops; and the switches the native path reads (`USE_NATIVE`,
`DECODE_PATH`). Its siblings hold what runs natively only: `fused_loss`, the whole sparse loss
in one token-major pass (decoder, residuals, and the dot products the backward needs) and one
latent-major pass (both weight gradients at once), each a 16-column panel at a time so the rows
they gather come from L2; and `unit_adam`, the unit-norm decoder's Adam step in one pass, which
leaves W in panels for that decoder. On CUDA with triton importable the sparse ops run on
the Triton kernels of `sae_core.sae.triton` (`triton_for`, switch `TRITON`). Elsewhere stock
torch ops compose the same step under autograd (topk, embedding_bag, a CSR x dense product).
Every path is tested against the dense reference.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from functools import cache
from types import ModuleType

import torch
import torch.nn.functional as F

from sae_core.sae import native
from sae_core.sae.gemm_layout import aligned

USE_NATIVE = True  # tests switch this off to exercise the stock-op path
# The native decoder's layout: "auto" picks by L2 size; tests force "panels" or "rows".
DECODE_PATH = "auto"
_DECODE_PATHS = {"auto": 0, "panels": 1, "rows": 2}
# Where the sparse ops take the Triton kernels: "auto" on CUDA tensors when triton imports;
# "always" wherever triton imports (the tests, on CPU under TRITON_INTERPRET=1); "never".
TRITON = "auto"


def native_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The native module when every tensor is a CPU float32/int64 tensor and it can be built."""
    if not USE_NATIVE or any(t.device.type != "cpu" for t in tensors):
        return None
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        return None
    return native.load()


@cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_for(*tensors: torch.Tensor) -> ModuleType | None:
    """`sae_core.sae.triton.ops` when the sparse ops run on the Triton kernels (per `TRITON`:
    by default when every tensor is on CUDA and triton imports), else None."""
    if TRITON == "never" or not _triton_importable():
        return None
    if TRITON == "auto" and any(t.device.type != "cuda" for t in tensors):
        return None
    from sae_core.sae.triton import ops

    return ops


def sparse_path(device: torch.device) -> str:
    """The kernels a training step's sparse ops take on `device`: "triton", "native" (the CPU
    float32 C++ kernels) or "torch" (stock ops)."""
    probe = torch.empty(0, device=device)
    if triton_for(probe) is not None:
        return "triton"
    return "native" if native_for(probe) is not None else "torch"


def topk_native(x: torch.Tensor) -> ModuleType | None:
    """The native module when `topk` runs natively on x (CPU float32), else None."""
    return native_for(x)


def decode_path() -> int:
    """DECODE_PATH as the native decoder's `path` argument."""
    return _DECODE_PATHS[DECODE_PATH]


def decoder_uses_panels(n: int) -> bool:
    """Whether the native decoder reads W [n, d] in panels (else row by row), per DECODE_PATH."""
    path = DECODE_PATH
    return path == "panels" or (path == "auto" and bool(native.load().panels_fit_l2(n)))


def topk(
    x: torch.Tensor, k: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k of x + bias, descending. x: [B, m]; bias: [m] or None -> (vals [B, k],
    idx [B, k] int64). ~B m work; the native kernel adds the bias as it reads (no [B, m] temporary)
    and reads rows in place when each is contiguous (a padded row stride, as `preacts` leaves)."""
    ext = native_for(x) if bias is None else native_for(x, bias)
    if ext is not None:
        empty = x.new_empty(0)
        rows = x if x.stride(1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()
        vals, idx = ext.topk_rows(rows, k, empty if bias is None else bias.contiguous())
        return vals, idx
    return (x if bias is None else x + bias).topk(k, dim=1, sorted=True)


# The encoder's [B, n] output rows lie n + PRE_ROW_PAD elements apart: MKL's GEMM writes them
# about 2% faster so (alternated GEMMs here: 1.2-2.5 ms less of ~120 at n = 4,608, 13 of ~430
# at n = 16,384). Likely cause: rows a multiple of 2 KB apart (18,432 B; 64 KB) map its output
# tiles onto few L1 sets, and 256 bytes more per row spread them.
PRE_ROW_PAD = 64


def padded_rows(
    rows: int,
    cols: int,
    dtype: torch.dtype,
    device: torch.device | str,
    storage: torch.Tensor | None = None,
) -> torch.Tensor:
    """An uninitialised [rows, cols] tensor with a row stride of cols + PRE_ROW_PAD, for the
    encoder's output. storage: a uint8 tensor to view instead of a new allocation (it needs
    `padded_bytes(rows, cols, dtype)` bytes)."""
    stride = aligned(cols + PRE_ROW_PAD)  # a 16-bit GEMM's output on tensor cores too
    if storage is None:
        return torch.empty(rows, stride, dtype=dtype, device=device)[:, :cols]
    return storage[: padded_bytes(rows, cols, dtype)].view(dtype).view(rows, stride)[:, :cols]


def padded_bytes(rows: int, cols: int, dtype: torch.dtype) -> int:
    """The bytes under a `padded_rows` tensor."""
    return rows * aligned(cols + PRE_ROW_PAD) * dtype.itemsize


def encoder_preacts(
    x: torch.Tensor,
    b_pre: torch.Tensor | None,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - b_pre) W_enc^T + b_enc, without autograd. x: [B, d] -> [B, n]. Cost 2 B d n flops.
    b_pre=None: x is already x - b_pre (training's normaliser subtracts it in its pass).

    `out` lets the caller reuse one [B, n] buffer across steps (the step's only B x n tensor);
    x - b_pre then goes to a reused [B, d] buffer too (0.6 ms less than a fresh one at B = 4096,
    d = 576 in a training step here). b_enc=None leaves the bias out, for a
    `topk(..., bias=b_enc)` to add while reading: a bias in the GEMM costs two more passes over
    its [B, n] output (a broadcast copy, then beta=1).
    """
    with torch.no_grad():
        if b_pre is None:
            xc = x
        else:
            reused = BUFFERS.take(tuple(x.shape), x.device, x.dtype) if out is not None else None
            xc = torch.sub(x, b_pre, out=reused)
        if b_enc is None:
            return torch.mm(xc, W_enc.t(), out=out)
        if out is None:
            return torch.addmm(b_enc, xc, W_enc.t())
        return torch.addmm(b_enc, xc, W_enc.t(), out=out)


def normalize_tokens(
    x: torch.Tensor, eps: float, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token normalisation: x [B, d] -> (x_norm [B, d], shift [B, 1], scale [B, 1]) with
    shift the token's mean, scale = max(||x - shift||, eps), x_norm = (x - shift) / scale, less
    offset ([d]) when given. O(B d); natively one read and one write of x (each row normalised
    while in L1)."""
    needs = x.requires_grad or (offset is not None and offset.requires_grad)
    grad = torch.is_grad_enabled() and needs
    ext = native_for(x) if offset is None else native_for(x, offset)
    if ext is not None and not grad:
        off = x.new_empty(0) if offset is None else offset.contiguous()
        x_norm, shift, scale = ext.normalize_tokens(x.contiguous(), eps, off)
        return x_norm, shift, scale
    shift = x.mean(dim=1, keepdim=True)
    centred = x - shift
    scale = centred.norm(dim=1, keepdim=True).clamp_min(eps)
    # In place (when no gradient is asked for): one [B, d] temporary instead of two.
    x_norm = centred.div_(scale) if not grad else centred / scale
    if offset is not None:
        x_norm = x_norm.sub_(offset) if not grad else x_norm - offset
    return x_norm, shift, scale


def scatter_outer(idx: torch.Tensor, coef: torch.Tensor, src: torch.Tensor, n: int) -> torch.Tensor:
    """G^T src for the sparse G [B, n] with G[b, idx[b, i]] += coef[b, i].

    idx, coef: [B, K]; src: [B, d] -> [n, d], i.e. out[idx[b, i]] += coef[b, i] * src[b].
    Cost: a sort of B K indices plus B K d multiply-adds as a CSR x dense product; no
    [B, K, d] temporary and no dense [B, n] matrix.
    """
    B, K = idx.shape
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)  # stable: a fixed summation order, deterministic
    counts = torch.bincount(flat, minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.int64, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    tokens = torch.div(order, K, rounding_mode="floor")
    with warnings.catch_warnings():  # torch calls CSR "beta"; this product is tested against dense
        warnings.simplefilter("ignore", UserWarning)
        G_t = torch.sparse_csr_tensor(
            crow, tokens, coef.reshape(-1)[order].to(src.dtype), size=(n, B), check_invariants=False
        )
    return G_t @ src


class _SelectedPreacts(torch.autograd.Function):
    """Selected pre-activations (values from the selection), gradients only at those entries."""

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, values, idx):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(x, b_pre, W_enc, idx)
        ctx.n = W_enc.shape[0]
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        x, b_pre, W_enc, idx = ctx.saved_tensors
        grad = grad.contiguous()
        flat_idx, flat_grad = idx.reshape(-1), grad.reshape(-1)
        need_x, need_b_pre, need_w, need_b = ctx.needs_input_grad[:4]
        d_b_enc = torch.zeros(ctx.n, dtype=grad.dtype, device=grad.device).index_add_(
            0, flat_idx, flat_grad
        )
        d_W = scatter_outer(idx, grad, x - b_pre, ctx.n).to(W_enc.dtype) if need_w else None
        # d pre / d b_pre = -W_enc^T summed over selected entries = -(d_b_enc @ W_enc): O(n d).
        d_b_pre = -(d_b_enc.to(W_enc.dtype) @ W_enc) if need_b_pre else None
        d_x = (
            F.embedding_bag(idx, W_enc, per_sample_weights=grad.to(W_enc.dtype), mode="sum")
            if need_x
            else None
        )
        return d_x, d_b_pre, d_W, (d_b_enc if need_b else None), None, None


def selected_preacts(
    x: torch.Tensor,
    b_pre: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    values: torch.Tensor,
    idx: torch.Tensor,
    dense: bool = False,
) -> torch.Tensor:
    """The pre-activations at idx, with gradients to W_enc, b_enc, b_pre (and x if it needs one).

    x: [B, d]; values: [B, K], the entries of `encoder_preacts` at idx [B, K] (top-k returns
    them) -> [B, K]. Sparse backward cost: B K d for d W_enc plus O(n d). dense=True is the
    reference, which recomputes the full GEMM with autograd (2 B d n forward, 4 B d n backward).
    """
    if dense:
        return ((x - b_pre) @ W_enc.t() + b_enc).gather(1, idx)
    ops = triton_for(x, W_enc)
    if ops is not None:
        return ops.selected_preacts(x, b_pre, W_enc, b_enc, values, idx)
    return _SelectedPreacts.apply(x, b_pre, W_enc, b_enc, values, idx)


def sparse_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    W_dec: torch.Tensor,
    bias: torch.Tensor | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """bias + sum_i vals[b, i] W_dec[idx[b, i]]. idx, vals: [B, K]; W_dec: [n, d]; bias: [d]
    -> [B, d].

    Sparse: B K d flops forward and backward (Triton on CUDA; embedding_bag; the native
    gather-sum without autograd). dense=True builds the [B, n] latent matrix and multiplies (2 B n d flops each
    way), for reference.
    """
    if bias is None:
        bias = W_dec.new_zeros(W_dec.shape[1])
    if dense:
        z = vals.new_zeros(idx.shape[0], W_dec.shape[0]).scatter_add(1, idx, vals)
        return z @ W_dec + bias
    ops = triton_for(vals, W_dec, bias)
    if ops is not None:  # float32 out, whatever the inputs' float dtypes
        return ops.sparse_decode(idx, vals, W_dec, bias)
    vals = vals.to(W_dec.dtype)
    ext = native_for(vals, W_dec, bias)
    if ext is not None and not torch.is_grad_enabled():  # inference: the native gather-sum
        return ext.gather_sum(
            idx.contiguous(), vals.contiguous(), W_dec.contiguous(), bias.contiguous()
        )
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + bias


class _ReusedBuffers(threading.local):
    """Buffers handed out again once nothing else holds them (a graph saved for backward holds
    its own). A fresh 19 MB buffer cost 4,608 page faults per step here (counted with getrusage).
    Per thread: two trainers in two threads never share one."""

    def __init__(self) -> None:
        self.free: dict[tuple[tuple[int, ...], torch.device, torch.dtype], torch.Tensor] = {}

    def take(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        key = (shape, device, dtype)
        buf = self.free.get(key)
        if buf is None or buf._use_count() > 1:  # none yet, or a live graph still holds it
            buf = self.free[key] = torch.empty(shape, device=device, dtype=dtype)
        return buf


BUFFERS = _ReusedBuffers()  # the encoder's x - b_pre and the fused loss's per-token rows


def fire_counts(idx: torch.Tensor, vals: torch.Tensor, n: int, threshold: float) -> torch.Tensor:
    """[n]: how many entries of each latent exceed threshold. idx: [B, K] latents < n; vals:
    [B, K] their activations (vals' dtype). O(B K + n)."""
    ext = native_for(idx, vals)
    if ext is not None:
        return ext.fire_counts(idx.contiguous(), vals.contiguous(), n, threshold)
    hits = torch.zeros(n, dtype=vals.dtype, device=vals.device)
    return hits.index_add_(0, idx.reshape(-1), (vals > threshold).reshape(-1).to(vals.dtype))


@torch.no_grad()
def project_rows_(W: torch.Tensor, G: torch.Tensor) -> None:
    """G[j] -= <G[j], W[j]> W[j] in place, for unit-norm rows W: [n, d]. One pass (native)."""
    ext = native_for(W, G)
    if ext is not None and W.is_contiguous() and G.is_contiguous():
        ext.project_rows(W, G)
    else:
        G -= (G * W).sum(dim=1, keepdim=True) * W


@torch.no_grad()
def normalize_rows_(W: torch.Tensor) -> None:
    """W[j] /= ||W[j]|| in place. W: [n, d]. One pass (native)."""
    ext = native_for(W)
    if ext is not None and W.is_contiguous():
        ext.normalize_rows(W)
    else:
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
