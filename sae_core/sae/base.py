"""What every SAE kind shares: selection (TopK, multi-TopK, BatchTopK, AuxK), the sparse loss,
the raw-space codec, OMP inference and safetensors I/O. A kind supplies its weights, the
encoder's dense matrix, the selected pre-activations with gradients, the sparse decoder and
the decoder's unit-norm constraint.

Shapes: B tokens, d model width, n latents, K selected latents per token. Latent-major layout:
decoder row j is the unit-norm direction of latent j.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any, ClassVar, NamedTuple, Self

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from torch import Tensor, nn

from sae_core.config import SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae import kernels
from sae_core.sae.gemm_layout import aligned_operand
from sae_core.sae.normalize import InputNorm, NormStats
from sae_core.sae.omp import omp
from sae_core.sae.ranks import SINGLE, Ranks
from sae_core.sae.safetensors_io import safetensors_bytes, safetensors_metadata

FORMAT_VERSION = "1"
FIRE_THRESHOLD = 1e-3  # a latent "fires" on a token when its activation exceeds this
THRESHOLD_DECAY = 0.9  # BatchTopK: moving-average decay of the inference threshold
THRESHOLD_CHUNK = 4096  # BatchTopK: rows per boundary when calibrating (a training batch's size)


class ForwardOutput(NamedTuple):
    """One training forward pass on normalised inputs x: [B, d]."""

    latent_idx: torch.Tensor  # [B, k] int64
    latent_vals: torch.Tensor  # [B, k] after ReLU (may be 0)
    recon: torch.Tensor | None  # [B, d] normalised space (None: losses(with_recon=False))
    loss: torch.Tensor  # nmse (+ multi-TopK term) + aux_alpha * aux_loss
    nmse: torch.Tensor  # MSE / MSE of predicting the batch mean
    aux_loss: torch.Tensor  # AuxK normalised MSE of the residual (0 when nothing is dead)
    aux_idx: torch.Tensor  # [B, k_aux'] the dead latents AuxK used ([B, 0] when none)


class Selection(NamedTuple):
    """Which latents a training step uses for each token."""

    idx: torch.Tensor  # [B, k] ([B, 4k] multi-TopK, [B, w] BatchTopK), descending pre-activation
    pre: torch.Tensor  # [B, k] their pre-activations (BatchTopK padding slots: -inf)
    aux_idx: torch.Tensor  # [B, k_aux'] dead latents for AuxK, [B, 0] when none
    aux_pre: torch.Tensor  # [B, k_aux'] their pre-activations


class Codes(NamedTuple):
    """Sparse codes of raw activations; `stats` undoes the input normalisation in `decode`."""

    idx: torch.Tensor  # [B, k] int64
    vals: torch.Tensor  # [B, k]
    stats: NormStats


def normalized_mse(
    target: torch.Tensor, recon: torch.Tensor, ranks: Ranks = SINGLE
) -> torch.Tensor:
    """sum ||target - recon||^2 / sum ||target - mean(target)||^2 over the batch. [B, d] -> [].

    The denominator is a constant of the data (target carries no gradient here). Data
    parallel: the numerator is this rank's slice, the denominator the global batch's, so the
    ranks' values (and gradients) sum to the global batch's.
    """
    with torch.no_grad():
        base = ranks.batch_spread(target)
    return F.mse_loss(recon, target, reduction="sum") / base.clamp_min(1e-12)


def batch_topk(
    pre: torch.Tensor, k: int, bias: torch.Tensor | None = None, ranks: Ranks = SINGLE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK selection: the k B largest activations of the whole batch (relu(pre + bias)).

    pre: [B, n]; bias: [n] or None -> (vals [B, w], idx [B, w], thr []): each row's kept
    latents first, descending, then padding slots with vals = -inf; w is the largest count kept
    in a row. Exact: each row's top m are candidates and m doubles while some row's m-th
    candidate still reaches the threshold (a row could hold more). Cost ~B n per round (one
    round unless some token needs more than 2k latents) plus a top-(k B) of the B m candidates.
    Data parallel (pre is this rank's [B/W, n] slice): the threshold is the global batch's, from
    the candidates of every rank (an all-gather of B m floats per round).
    """
    B, n = pre.shape
    m = min(n, 2 * k)
    while True:
        vals, idx = kernels.topk(pre, m, bias)
        vals = vals.float()
        candidates = ranks.gather(vals.clamp_min(0).reshape(-1))
        thr = candidates.topk(min(k * B * ranks.world_size, candidates.numel())).values[-1]
        reaches = ranks.max_((vals[:, -1] >= thr).any().to(torch.int32))
        if m == n or not bool(reaches):
            break
        m = min(n, 2 * m)
    keep = (vals >= thr) & (vals > 0)
    width = max(1, int(keep.sum(dim=1).max()))
    vals, keep = vals[:, :width], keep[:, :width]
    return vals.masked_fill(~keep, float("-inf")), idx[:, :width], thr


class SparseAutoencoder(nn.Module, ABC):
    """An SAE of width d with cfg.n_latents latents, k of them active per token (BatchTopK: k per
    token on average over a training batch, a learned threshold at inference).

    z = ReLU(TopK_k(E (x - b_pre) + b_enc)), x_hat = D^T z + b_pre on normalised x, with the
    kind's encoder E and decoder D, both [n, d] (`encoder_matrix`, `dense_decoder`).
    """

    FORMAT: ClassVar[str]  # the safetensors `format` metadata of the kind's files
    KIND: ClassVar[str]  # the sae.kind it implements

    def __init__(
        self,
        d: int,
        cfg: SAEConfig,
        norm: InputNorm | None = None,
        generator: torch.Generator | None = None,
    ):
        if cfg.kind != self.KIND:
            raise ConfigError(
                f"{type(self).__name__} needs sae.kind={self.KIND}, got {cfg.kind!r}; "
                "build it with sae_core.sae.build_sae"
            )
        super().__init__()
        self.d, self.cfg = d, cfg
        self.n_latents, self.k = cfg.n_latents, cfg.k
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d // 2)
        self.norm = norm or InputNorm(cfg.normalize)
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d))
        self._pre_buffer: torch.Tensor | None = None
        if cfg.batch_topk:
            # BatchTopK's inference threshold, estimated during training (NaN until then: encode
            # falls back to the top k per token).
            self.register_buffer("threshold", torch.tensor(float("nan")))
        self.init_weights(generator)

    # What a kind provides --------------------------------------------------------------------
    @abstractmethod
    def init_weights(self, generator: torch.Generator | None) -> None:
        """Draw the kind's weights from `generator`: unit-norm decoder directions, the encoder
        tied to them at initialisation only."""

    @abstractmethod
    def encoder_matrix(self) -> torch.Tensor:
        """The encoder as a dense [n, d] matrix: the one GEMM's weights (no autograd needed)."""

    @abstractmethod
    def dense_decoder(self) -> torch.Tensor:
        """The decoder directions as a dense [n, d] matrix (differentiable w.r.t. the weights)."""

    @abstractmethod
    def selected_preacts(
        self, x: torch.Tensor, pre: torch.Tensor, idx: torch.Tensor, dense: bool = False
    ) -> torch.Tensor:
        """Pre-activations at idx [B, K] of normalised x [B, d], with gradients to the encoder's
        parameters; pre [B, K]: their values from the selection. dense=True: the reference."""

    @abstractmethod
    def sparse_decode(
        self, idx: Tensor, vals: Tensor, bias: Tensor | None = None, dense: bool = False
    ) -> Tensor:
        """bias + sum_i vals[b, i] D[idx[b, i]]: [B, K] codes -> [B, d], with autograd.
        dense=True: the reference through the [B, n] code matrix and `dense_decoder`."""

    @abstractmethod
    def project_decoder_grad(self) -> None:
        """Remove from each decoder direction's gradient its radial component (before the step)."""

    @abstractmethod
    def normalize_decoder(self) -> None:
        """Rescale every decoder direction to unit norm (after the step)."""

    def unit_decoder_keeping_codes_(self) -> None:
        """Bring every decoder direction back to unit norm where averaging weights (schedule-free
        training) shortened them. Kinds that can move each direction's norm into its code (the
        encoder's row and bias) keep their reconstructions; this default rescales the directions
        only."""
        self.normalize_decoder()

    def unit_row_decoder(self) -> nn.Parameter | None:
        """The decoder when it is one dense [n, d] parameter of unit-norm rows, else None. Its
        projection, optimiser step and renormalisation can then run as one pass
        (`train.Trainer`, `unit_adam.adam_unit_rows_`)."""
        return None

    # Encoder and selection -------------------------------------------------------------------
    def preacts(
        self,
        x: torch.Tensor,
        with_bias: bool = True,
        dtype: torch.dtype | None = None,
        centred: bool = False,
    ) -> torch.Tensor:
        """Dense pre-activations [B, n] of normalised x [B, d], no autograd: the step's one GEMM.

        Written into one buffer reused across calls of the same shape (the only B x n tensor).
        with_bias=False leaves b_enc out for `select(..., bias=b_enc)` to add as it reads.
        dtype: the GEMM's precision (e.g. torch.bfloat16; default the weights' dtype).
        centred=True: x is x - b_pre already (`norm.apply(x_raw, offset=b_pre)`).
        """
        dtype = dtype or self.b_enc.dtype
        shape = (x.shape[0], self.n_latents)
        buf = self._pre_buffer
        if buf is None or buf.shape != shape or buf.device != x.device or buf.dtype != dtype:
            buf = self._pre_buffer = kernels.padded_rows(*shape, dtype, x.device)
        b_enc = self.b_enc.to(dtype) if with_bias else None
        with torch.no_grad():
            W = aligned_operand(self.encoder_matrix(), dtype)
            if W.shape[1] != x.shape[1]:  # tensor-core padding: x - b_pre into the padded rows
                x = aligned_operand(x, dtype, offset=None if centred else self.b_pre)
                return kernels.encoder_preacts(x, None, W, b_enc, out=buf)
        b_pre = None if centred else self.b_pre.to(dtype)
        return kernels.encoder_preacts(x.to(dtype), b_pre, W, b_enc, out=buf)

    def select(
        self,
        pre: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        ranks: Ranks = SINGLE,
    ) -> Selection:
        """TopK (4k with multi-TopK, descending so the first k are TopK_k; BatchTopK: the top
        k B of the batch) and AuxK's choice: the top k_aux among the dead latents only.

        pre: [B, n] (any float dtype); bias: [n] still to add to pre (see `preacts`), or None.
        Cost ~B n + B n_dead. The returned pre-activations are float32. ranks: pre is this
        rank's slice of the batch (BatchTopK then selects over the global batch).
        """
        with torch.no_grad():
            if bias is not None and kernels.topk_native(pre) is None:
                pre.add_(bias.to(pre.dtype))  # stock top-k: add it in place, no second buffer
                bias = None
            if self.cfg.batch_topk:
                vals, idx, _ = batch_topk(pre, self.k, bias, ranks)
            else:
                vals, idx = kernels.topk(pre, 4 * self.k if self.cfg.multi_topk else self.k, bias)
            aux_vals, aux_idx = vals[:, :0], idx[:, :0]
            if dead_mask is not None and self.cfg.aux_alpha > 0 and bool(dead_mask.any()):
                k_aux = min(self.k_aux, int(dead_mask.sum()))
                if kernels.topk_native(pre) is not None:
                    # Live latents get a bias of -inf: the same buffer, no [B, n_dead] copy.
                    base = pre.new_zeros(self.n_latents) if bias is None else bias
                    aux_bias = base.masked_fill(~dead_mask, float("-inf"))
                    aux_vals, aux_idx = kernels.topk(pre, k_aux, aux_bias)
                else:
                    dead = dead_mask.nonzero().squeeze(1)
                    aux_vals, local = kernels.topk(pre.index_select(1, dead), k_aux)
                    aux_idx = dead[local]
        return Selection(idx, vals.float(), aux_idx, aux_vals.float())

    @torch.no_grad()
    def update_threshold(
        self, sel: Selection, decay: float = THRESHOLD_DECAY, ranks: Ranks = SINGLE
    ) -> None:
        """BatchTopK: fold this batch's smallest kept activation (over all ranks) into the
        inference threshold (an exponential moving average; the first batch sets it)."""
        kept = sel.pre[sel.pre > 0]
        low = kept.min() if kept.numel() else sel.pre.new_tensor(float("inf"))
        low = ranks.min_(low)
        if torch.isinf(low):
            return
        if torch.isnan(self.threshold):
            self.threshold.copy_(low)
        else:
            self.threshold.mul_(decay).add_(low, alpha=1 - decay)

    @torch.no_grad()
    def calibrate_threshold_(self, rows: Tensor, chunk: int = THRESHOLD_CHUNK) -> None:
        """BatchTopK: set the inference threshold from training rows [N, d] ([N, 2d] for a
        transcoder) for the weights as they are now: each chunk's boundary (the value exactly
        k latents per row on average exceed), averaged over chunks, as training tracks it.

        For weights other than those the threshold was tracked on: schedule-free's average,
        its decoder rows brought back to unit norm, rescales every code; on the research preset
        the tracked threshold then kept ~22 of k = 32, and the one keeping k was 0.78-0.81 of it.
        Cost: one encoder GEMM per chunk and a selection over chunk x n values."""
        x_raw, _ = self.split_batch(rows.to(self.b_pre.device))
        bounds = []
        for start in range(0, x_raw.shape[0] - chunk + 1, chunk) or [0]:
            x, _ = self.norm.apply(x_raw[start : start + chunk].to(self.b_pre.dtype))
            pre = kernels.encoder_preacts(x, self.b_pre, self.encoder_matrix(), self.b_enc)
            kept = min(self.k * x.shape[0], pre.numel() - 1)
            # The (kept + 1)-th largest value: exactly `kept` values lie above it.
            bounds.append(pre.flatten().topk(kept + 1).values[-1])
        self.threshold.copy_(torch.stack(bounds).mean().clamp_min(0))

    def fused_losses(
        self, x: Tensor, sel: Selection, ranks: Ranks, with_recon: bool, centred: bool
    ) -> ForwardOutput | None:
        """`losses` (not dense) in a kind's fused kernels, or None where it has none for these
        inputs: then the stock ops below run."""
        return None

    def output(self, x: Tensor, idx: Tensor, vals: Tensor, dense: bool = False) -> Tensor:
        """What the codes idx, vals [B, K] of normalised x [B, d] predict, normalised, with
        autograd: for an SAE, the reconstruction of x (`sparse_decode` plus b_pre)."""
        return self.sparse_decode(idx, vals, self.b_pre, dense)

    def split_batch(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """A training batch [B, ...] as (the raw input [B, d], the normalised target, or None
        when the target is the input: an SAE's batch is its input alone)."""
        return batch, None

    def losses(
        self,
        x: torch.Tensor,
        sel: Selection,
        dense: bool = False,
        ranks: Ranks = SINGLE,
        with_recon: bool = True,
        centred: bool = False,
        target: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Decode the selected latents and score them under autograd. x: [B, d] normalised.

        Cost: the kind's `selected_preacts` and `sparse_decode` on K = k (+ 3k multi-TopK,
        + k_aux) latents per token. dense=True: the references, same selections. ranks: x is
        this rank's slice; the loss terms are its shares of the global batch's (`normalized_mse`).
        with_recon: whether the output carries the reconstruction (this path computes it anyway).
        centred=True: x is x - b_pre already, with no graph to b_pre (see `preacts`).
        A kind with fused kernels for its inputs takes over (`fused_losses`), unless dense.
        target: [B, d_out] normalised, what `output` must predict (a transcoder's output hook);
        None: x itself (an SAE).
        """
        fused = None
        if not dense and target is None:
            fused = self.fused_losses(x, sel, ranks, with_recon, centred)
        if fused is not None:
            return fused
        if centred:  # b_pre's gradient comes from the graph below
            x = x + self.b_pre.detach()
        goal = x if target is None else target
        # BatchTopK's code has a variable width; its padding slots hold pre = -inf (act 0, no gradient).
        k = sel.idx.shape[1] if self.cfg.batch_topk else self.k
        k_main = sel.idx.shape[1]
        use_aux = sel.aux_idx.shape[1] > 0
        all_idx = torch.cat([sel.idx, sel.aux_idx], dim=1) if use_aux else sel.idx
        all_pre = torch.cat([sel.pre, sel.aux_pre], dim=1) if use_aux else sel.pre
        acts = torch.relu(self.selected_preacts(x, all_pre, all_idx, dense))
        if self.cfg.batch_topk:  # padding slots' pre-activations may be recomputed: zero them
            acts = acts * (all_pre > float("-inf"))
        vals = acts[:, :k]
        loss, nmse, recon = self.reconstruction_terms(x, goal, sel.idx[:, :k], vals, ranks, dense)
        if k_main > k:  # multi-TopK: L(k) + L(4k) / 8
            recon_4k = self.output(x, sel.idx, acts[:, :k_main], dense)
            loss = loss + normalized_mse(goal, recon_4k, ranks) / 8
        aux_loss = x.new_zeros(())
        if use_aux:
            residual = (goal - recon).detach()
            aux_recon = self.sparse_decode(sel.aux_idx, acts[:, k_main:], dense=dense)
            aux_loss = normalized_mse(residual, aux_recon, ranks).nan_to_num(0.0)
            loss = loss + self.cfg.aux_alpha * aux_loss
        recon = recon if with_recon else None
        return ForwardOutput(sel.idx[:, :k], vals, recon, loss, nmse, aux_loss, sel.aux_idx)

    def reconstruction_terms(
        self, x: Tensor, goal: Tensor, idx: Tensor, vals: Tensor, ranks: Ranks, dense: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss, nmse, recon) of the code idx, vals: [B, K] for normalised x: [B, d], scored
        against goal (x itself, or a transcoder's target): `output`'s normalised MSE as the
        loss; a kind with other terms overrides it."""
        recon = self.output(x, idx, vals, dense)
        nmse = normalized_mse(goal, recon, ranks)
        return nmse, nmse, recon

    def forward(
        self,
        x: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        dense: bool = False,
        target: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """Training pass on normalised x: [B, d]; dead_mask: [n] bool, the latents AuxK may use;
        target: a transcoder's normalised output [B, d_out] (see `losses`).

        Cost (sparse): one encoder GEMM, a top-k over [B, n], then the kind's sparse loss.
        """
        sel = self.select(self.preacts(x), dead_mask)
        return self.losses(x, sel, dense, target=target)

    def free_buffer(self) -> None:
        """Drop the [B, n] pre-activation buffer kept between training steps."""
        self._pre_buffer = None

    def use_buffer(self, buf: torch.Tensor) -> None:
        """Write the pre-activations into buf: [B, n] in the GEMM's dtype, e.g. a view of one
        buffer shared by SAEs that step one after another (a group, `train.run_group`)."""
        self._pre_buffer = buf

    # Inference on raw activations ------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x_raw: torch.Tensor) -> Codes:
        """x_raw: [B, d] -> Codes(idx [B, w], vals [B, w], stats). Cost: one GEMM + top-k.

        w = k, except for a BatchTopK SAE with a threshold: every latent whose pre-activation
        reaches it is kept, w is the largest count in the batch and shorter rows are padded
        with value 0 (count active latents as vals > 0).
        """
        x, stats = self.norm.apply(x_raw.to(self.b_pre.dtype))
        pre = kernels.encoder_preacts(x, self.b_pre, self.encoder_matrix(), self.b_enc)
        if self.cfg.batch_topk and not torch.isnan(self.threshold):
            thr = self.threshold.clamp_min(0)
            width = max(1, int((pre > thr).sum(dim=1).max()))
            vals, idx = kernels.topk(pre, min(width, self.n_latents))
            return Codes(idx, torch.where(vals > thr, vals, 0.0), stats)
        vals, idx = kernels.topk(pre, self.k)
        return Codes(idx, torch.relu(vals), stats)

    @torch.no_grad()
    def omp_encode(self, x_raw: torch.Tensor, k: int | None = None) -> Codes:
        """Orthogonal matching pursuit over the decoder instead of the encoder: x_raw [B, d] ->
        Codes(idx [B, k], vals [B, k] signed least-squares coefficients, stats); k default
        cfg.k. Runs on the normalised input with b_pre removed, so `decode` inverts it.

        Cost: k dense [B, d] x [d, n] products plus O(B k^2 d + B k^3) (see `omp.omp`);
        memory B k d for the chosen atoms: chunk large batches.
        """
        x, stats = self.norm.apply(x_raw.to(self.b_pre.dtype))
        idx, vals = omp(x - self.b_pre, self.dense_decoder(), k or self.k)
        return Codes(idx, vals, stats)

    @torch.no_grad()
    def decode(
        self, idx: torch.Tensor, vals: torch.Tensor, stats: NormStats | None = None
    ) -> torch.Tensor:
        """Codes -> raw reconstruction [B, d]. idx, vals: [B, k]; the kind's sparse decoder.

        `stats` comes from `encode` (Codes.stats); it is required in per_token mode, where
        each token's shift and scale are not recoverable from the codes.
        """
        recon = self.sparse_decode(idx, vals.to(self.b_pre.dtype), self.b_pre)
        return self.norm.invert(recon, stats)

    @torch.no_grad()
    def reconstruct(self, x_raw: torch.Tensor) -> torch.Tensor:
        """x_raw: [B, d] -> x_hat_raw: [B, d]."""
        return self.decode(*self.encode(x_raw))

    # Safetensors I/O -------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": self.FORMAT,
            "format_version": FORMAT_VERSION,
            "d": str(self.d),
            "config": self.cfg.model_dump_json(),
            "normalization": json.dumps(self.norm.to_json()),
        }

    def to_bytes(self) -> bytes:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        return safetensors_bytes(tensors, self.metadata())

    def save_safetensors(self, target: str | Path | IO[bytes]) -> None:
        """Weights, config and normalisation constants in one safetensors file (no pickle)."""
        data = self.to_bytes()
        if isinstance(target, str | Path):
            Path(target).write_bytes(data)
        else:
            target.write(data)

    @classmethod
    def from_bytes(cls, data: bytes) -> Self:
        meta = safetensors_metadata(data)
        if meta.get("format") != cls.FORMAT:
            raise ConfigError(
                f"not a saeflow {cls.__name__} file (format={meta.get('format')!r}); "
                "sae_core.sae.load_sae_bytes reads any kind"
            )
        cfg = SAEConfig.model_validate_json(meta["config"])
        norm = InputNorm.from_json(json.loads(meta["normalization"]))
        sae = cls(int(meta["d"]), cfg, norm, **cls.init_from_metadata(meta))
        sae.load_state_dict(load_tensors(data))
        return sae

    @classmethod
    def init_from_metadata(cls, meta: dict[str, str]) -> dict[str, Any]:
        """A kind's own constructor arguments, read from its file's metadata (`metadata`)."""
        return {}

    @classmethod
    def load_safetensors(cls, source: str | Path | IO[bytes] | bytes) -> Self:
        if isinstance(source, bytes):
            return cls.from_bytes(source)
        if isinstance(source, str | Path):
            return cls.from_bytes(Path(source).read_bytes())
        return cls.from_bytes(source.read())
