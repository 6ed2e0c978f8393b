"""Expander SAEs (Mendoza-Smith, 2026): each decoder direction has `degree` non-zeros, at
coordinates given by a random left-degree-regular bipartite graph (an expander w.h.p.).

Compact layout, latent-major: `rows` int32 [n, degree] (the coordinates of latent j's
non-zeros, ascending) and `values` [n, degree] (their learned values); the dense equivalent
D[j, rows[j, t]] = values[j, t] is never a parameter. Decoder memory O(n degree), the sparse
decoder O(B K degree). Encoder: `untied` a dense W_enc [n, d] (Gao's recipe, same GEMM as
TopK), `tied` the masked decoder transposed at every step (the paper's choice).

Unlike the paper (signed top-k, no AuxK) the selection is the TopK recipe's (ReLU after
top-k, AuxK when cfg.aux_alpha > 0), so the evaluation code reads both kinds alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_core.config import check_expander_graph
from sae_core.sae import kernels
from sae_core.sae.base import SparseAutoencoder

FORMAT = "saeflow.expander"
_MASK_CHUNK = 2**22  # random keys drawn per chunk of latents while sampling the graph


def expander_mask(n: int, m: int, degree: int, seed: int) -> torch.Tensor:
    """A random left-degree-regular bipartite graph: rows int32 [n, degree], latent j's
    `degree` distinct coordinates in [0, m), ascending, every coordinate used by some latent
    (a ConfigError naming sae.degree when that is impossible).

    Each latent draws its coordinates uniformly without replacement (the largest `degree` of
    m uniform keys), reproducibly from `seed`. A coordinate left unused is then repaired:
    a random entry whose coordinate is used more than once moves to it (possible whenever
    degree n >= m; at realistic sizes the draw leaves none, e.g. P ~ 1e-7 per coordinate at
    n = 4608, m = 576, degree = 2). Cost O(n m) for the draw, O(n degree) per repair.
    """
    check_expander_graph(n, m, degree)
    g = torch.Generator().manual_seed(seed)
    chunk = max(1, _MASK_CHUNK // m)
    rows = torch.cat(
        [
            torch.rand(min(chunk, n - start), m, generator=g).topk(degree, dim=1).indices
            for start in range(0, n, chunk)
        ]
    )
    counts = torch.bincount(rows.reshape(-1), minlength=m)
    for c in (counts == 0).nonzero().squeeze(1).tolist():
        movable = (counts[rows] > 1).reshape(-1).nonzero().squeeze(1)
        pick = int(movable[torch.randint(len(movable), (), generator=g)])
        j, t = divmod(pick, degree)
        counts[rows[j, t]] -= 1
        rows[j, t] = c
        counts[c] += 1
    return rows.sort(dim=1).values.to(torch.int32)


def scatter_rows(rows: torch.Tensor, values: torch.Tensor, m: int) -> torch.Tensor:
    """The dense [n, m] matrix with D[j, rows[j, t]] = values[j, t], else 0. rows: [n, degree]
    int32, values: [n, degree]. Differentiable w.r.t. values; cost n m (the zero fill)."""
    dense = values.new_zeros(values.shape[0], m)
    return dense.scatter(1, rows.long(), values)


def expander_decode(
    idx: torch.Tensor,
    vals: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
) -> torch.Tensor:
    """bias + sum_i vals[b, i] D[idx[b, i]] for the compact decoder (rows, values).

    idx, vals: [B, K]; rows: [n, degree] int32; values: [n, degree]; bias: [m] -> [B, m].
    Gathers the K latents' coordinates and values, scales them by the activations and
    scatter-adds them into a copy of the bias: B K degree multiply-adds and a [B, K degree]
    temporary, each way (autograd: the backward gathers the output gradient at the same
    coordinates and index-adds into the selected rows of values).
    """
    coef = (F.embedding(idx, values) * vals.unsqueeze(2)).flatten(1)
    cols = rows.long()[idx].flatten(1)  # widened before the gather: n degree, not B K degree
    return bias.repeat(idx.shape[0], 1).scatter_add_(1, cols, coef)  # a copy: bias stays intact


def tied_selected_preacts(
    x: torch.Tensor,
    b_pre: torch.Tensor,
    rows: torch.Tensor,
    values: torch.Tensor,
    b_enc: torch.Tensor,
    idx: torch.Tensor,
) -> torch.Tensor:
    """<x - b_pre, D[idx]> + b_enc[idx] for the tied encoder (E = D), with autograd to values,
    b_enc and b_pre. x: [B, m]; idx: [B, K] -> [B, K]. Cost B K degree each way: each selected
    latent reads only its `degree` coordinates of the token."""
    cols = rows.long()[idx].flatten(1)
    picked = (x - b_pre).gather(1, cols).view(*idx.shape, rows.shape[1])
    return (picked * F.embedding(idx, values)).sum(dim=2) + b_enc[idx]


class ExpanderSAE(SparseAutoencoder):
    """An SAE whose decoder is masked by a random expander graph with cfg.degree non-zeros per
    latent (see the module docstring); the interface is TopKSAE's."""

    FORMAT = FORMAT
    KIND = "expander"

    def init_weights(self, generator: torch.Generator | None) -> None:
        cfg, d = self.cfg, self.d
        self.degree = cfg.degree
        self.register_buffer("rows", expander_mask(self.n_latents, d, self.degree, cfg.mask_seed))
        V = torch.randn(self.n_latents, self.degree, generator=generator)
        V /= V.norm(dim=1, keepdim=True)
        self.values = nn.Parameter(V)
        if cfg.encoder == "untied":  # tied at initialisation only
            self.W_enc = nn.Parameter(scatter_rows(self.rows, V, d))
        else:
            self.register_parameter("W_enc", None)

    def dense_decoder(self) -> torch.Tensor:
        """[n, d], zero outside the mask; cost n d."""
        return scatter_rows(self.rows, self.values, self.d)

    def encoder_matrix(self) -> torch.Tensor:
        """Untied: W_enc. Tied: the dense masked decoder, built for the step's one GEMM (n d to
        build, then 2 B d n flops like TopK's; a sparse product would be 2 B n degree flops
        but runs far below GEMM speed on CPUs and GPUs)."""
        return self.W_enc if self.W_enc is not None else self.dense_decoder()

    def selected_preacts(
        self, x: torch.Tensor, pre: torch.Tensor, idx: torch.Tensor, dense: bool = False
    ) -> torch.Tensor:
        """Untied: `kernels.selected_preacts` (B K d backward). Tied: recomputed from the K
        latents' non-zeros (B K degree), gradients to values; `pre` is not needed."""
        if self.W_enc is not None:
            return kernels.selected_preacts(x, self.b_pre, self.W_enc, self.b_enc, pre, idx, dense)
        if dense:
            return ((x - self.b_pre) @ self.dense_decoder().t() + self.b_enc).gather(1, idx)
        return tied_selected_preacts(x, self.b_pre, self.rows, self.values, self.b_enc, idx)

    def sparse_decode(
        self, idx: Tensor, vals: Tensor, bias: Tensor | None = None, dense: bool = False
    ) -> Tensor:
        """`expander_decode` (on CUDA the Triton compact decoder, `kernels.triton_for`): B K
        degree each way; dense=True multiplies the [B, n] code matrix by the dense masked
        decoder (2 B n d flops)."""
        if bias is None:
            bias = self.values.new_zeros(self.d)
        if dense:
            z = vals.new_zeros(idx.shape[0], self.n_latents).scatter_add(1, idx, vals)
            return z @ self.dense_decoder() + bias
        ops = kernels.triton_for(vals, self.values)
        if ops is not None:  # the compact decoder's Triton kernels (CUDA)
            return ops.compact_sparse_decode(idx, vals, self.rows, self.values, bias)
        return expander_decode(idx, vals.to(self.values.dtype), self.rows, self.values, bias)

    # Unit-norm decoder within the support ----------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each latent's values gradient its component along its values (tied: the
        gradient holds the encoder's part too; the constraint is on the shared values)."""
        if self.values.grad is not None:
            kernels.project_rows_(self.values, self.values.grad)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every latent's values to unit norm (the dense row's norm)."""
        kernels.normalize_rows_(self.values)

    @torch.no_grad()
    def resample_(self, latents: torch.Tensor, generator: torch.Generator) -> list[str]:
        """Re-initialise `latents` [L] int64 inside their mask support: random unit-norm values,
        b_enc 0 and (untied) the encoder row tied to the new decoder row, as at init.

        Returns the names of the parameters whose rows at `latents` changed, for the trainer
        to reset their optimiser state. The mask itself is kept.
        """
        V = torch.randn(len(latents), self.degree, generator=generator)
        V = (V / V.norm(dim=1, keepdim=True)).to(self.values)
        self.values[latents] = V
        self.b_enc[latents] = 0.0
        if self.W_enc is None:
            return ["values", "b_enc"]
        self.W_enc[latents] = scatter_rows(self.rows[latents], V, self.d)
        return ["values", "b_enc", "W_enc"]
