"""The kernels of a sparse-aware TopK SAE step, and the dense reference they must equal.

Shapes: B tokens, d model width, n latents, K selected latents per token (k, 4k for
multi-TopK, plus k_aux for AuxK). Weights are stored latent-major: W_enc, W_dec: [n, d].

Only `encoder_preacts` is dense (2 B d n flops). Everything after the selection touches the K
chosen latents per token: the decoder is a gather-sum over them, and the encoder's backward
scatters B K rows of d into its weight gradient, so the step costs about one dense GEMM plus
O(B K d) work instead of the ~6 GEMMs of a dense implementation.

On CPU with float32 the native kernels (`sae_core.sae.native`) run top-k, the gather-sum, the
row dot products and the scatters; elsewhere (CUDA, bf16, no compiler) stock torch ops do
(topk, embedding_bag, a CSR x dense product). Both paths are tested against the dense reference.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch
import torch.nn.functional as F

from sae_core.sae import native

USE_NATIVE = True  # tests switch this off to exercise the stock-op path


def _native_for(*tensors: torch.Tensor) -> ModuleType | None:
    """The native module when every tensor is a CPU float32/int64 tensor and it can be built."""
    if not USE_NATIVE or any(t.device.type != "cpu" for t in tensors):
        return None
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        return None
    return native.load()


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise top-k, descending. x: [B, m] -> (vals [B, k], idx [B, k] int64). ~B m work."""
    ext = _native_for(x)
    if ext is not None:
        vals, idx = ext.topk_rows(x.contiguous(), k)
        return vals, idx
    return x.topk(k, dim=1, sorted=True)


def encoder_preacts(
    x: torch.Tensor,
    b_pre: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - b_pre) W_enc^T + b_enc, without autograd. x: [B, d] -> [B, n]. Cost 2 B d n flops.

    `out` lets the caller reuse one [B, n] buffer across steps (the step's only B x n tensor).
    """
    with torch.no_grad():
        xc = x - b_pre
        if out is None:
            return torch.addmm(b_enc, xc, W_enc.t())
        return torch.addmm(b_enc, xc, W_enc.t(), out=out)


def scatter_outer(idx: torch.Tensor, coef: torch.Tensor, src: torch.Tensor, n: int) -> torch.Tensor:
    """G^T src for the sparse G [B, n] with G[b, idx[b, i]] += coef[b, i].

    idx, coef: [B, K]; src: [B, d] -> [n, d], i.e. out[idx[b, i]] += coef[b, i] * src[b].
    Cost: a sort of B K indices plus B K d multiply-adds (entries grouped by latent, one output
    row per thread); no [B, K, d] temporary and no dense [B, n] matrix.
    """
    B, K = idx.shape
    ext = _native_for(coef, src)
    if ext is not None:
        crow, entries = ext.csr_by_latent(idx.contiguous(), n)
        return ext.scatter_rows(crow, entries, K, coef.contiguous(), src.contiguous())
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
    return _SelectedPreacts.apply(x, b_pre, W_enc, b_enc, values, idx)


class _NativeDecode(torch.autograd.Function):
    """Gather-sum decoder; backward: one latent-wise pass gives d vals and d W together."""

    @staticmethod
    def forward(ctx, idx, vals, W_dec, bias):  # noqa: ANN001 - autograd signature
        ctx.save_for_backward(idx, vals, W_dec)
        return native.load().gather_sum(
            idx, vals.contiguous(), W_dec.contiguous(), bias.contiguous()
        )

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001
        idx, vals, W_dec = ctx.saved_tensors
        grad = grad.contiguous()
        ext = native.load()
        crow, entries = ext.csr_by_latent(idx, W_dec.shape[0])
        d_vals, d_W = ext.decode_backward(
            crow, entries, idx.shape[1], vals.contiguous(), W_dec.contiguous(), grad
        )
        d_bias = grad.sum(dim=0) if ctx.needs_input_grad[3] else None
        return None, d_vals, d_W, d_bias


def sparse_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    W_dec: torch.Tensor,
    bias: torch.Tensor | None = None,
    dense: bool = False,
) -> torch.Tensor:
    """bias + sum_i vals[b, i] W_dec[idx[b, i]]. idx, vals: [B, K]; W_dec: [n, d]; bias: [d]
    -> [B, d].

    Sparse: B K d flops forward and backward (d vals as row dot products, d W_dec as a scatter
    of rows). dense=True builds the [B, n] latent matrix and multiplies (2 B n d flops each
    way), for reference.
    """
    if bias is None:
        bias = W_dec.new_zeros(W_dec.shape[1])
    if dense:
        z = vals.new_zeros(idx.shape[0], W_dec.shape[0]).scatter_add(1, idx, vals)
        return z @ W_dec + bias
    vals = vals.to(W_dec.dtype)
    if _native_for(vals, W_dec, bias) is not None:
        return _NativeDecode.apply(idx.contiguous(), vals, W_dec, bias)
    return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum") + bias


@torch.no_grad()
def project_rows_(W: torch.Tensor, G: torch.Tensor) -> None:
    """G[j] -= <G[j], W[j]> W[j] in place, for unit-norm rows W: [n, d]. One pass (native)."""
    ext = _native_for(W, G)
    if ext is not None and W.is_contiguous() and G.is_contiguous():
        ext.project_rows(W, G)
    else:
        G -= (G * W).sum(dim=1, keepdim=True) * W


@torch.no_grad()
def normalize_rows_(W: torch.Tensor) -> None:
    """W[j] /= ||W[j]|| in place. W: [n, d]. One pass (native)."""
    ext = _native_for(W)
    if ext is not None and W.is_contiguous():
        ext.normalize_rows(W)
    else:
        W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)
