"""The TopK sparse autoencoder of Gao et al. (2024): model, loss, unit-norm decoder, I/O.

z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)), x_hat = W_dec^T z + b_pre, on normalised x.
Weights are latent-major: W_enc, W_dec: [n, d]; decoder row j (the paper's column j) is the
unit-norm direction of latent j.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from sae_core.config import ConfigError, SAEConfig
from sae_core.normalize import InputNorm, NormStats
from sae_core.sae import kernels

FORMAT = "saeflow.topk"
FORMAT_VERSION = "1"
FIRE_THRESHOLD = 1e-3  # a latent "fires" on a token when its activation exceeds this
THRESHOLD_DECAY = 0.9  # BatchTopK: moving-average decay of the inference threshold


class ForwardOutput(NamedTuple):
    """One training forward pass on normalised inputs x: [B, d]."""

    latent_idx: torch.Tensor  # [B, k] int64
    latent_vals: torch.Tensor  # [B, k] after ReLU (may be 0)
    recon: torch.Tensor  # [B, d] normalised space
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


def normalized_mse(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """sum ||target - recon||^2 / sum ||target - mean(target)||^2 over the batch. [B, d] -> [].

    The denominator is a constant of the data (target carries no gradient here).
    """
    with torch.no_grad():  # centred first: no cancellation when the data sit far from 0
        base = (target - target.mean(dim=0)).pow(2).sum()
    return F.mse_loss(recon, target, reduction="sum") / base.clamp_min(1e-12)


def batch_topk(
    pre: torch.Tensor, k: int, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchTopK selection: the k B largest activations of the whole batch (relu(pre + bias)).

    pre: [B, n]; bias: [n] or None -> (vals [B, w], idx [B, w], thr []): each row's kept
    latents first, descending, then padding slots with vals = -inf; w is the largest count kept
    in a row. Exact: each row's top m are candidates and m doubles while some row's m-th
    candidate still reaches the threshold (a row could hold more). Cost ~B n per round (one
    round unless some token needs more than 2k latents) plus a top-(k B) of the B m candidates.
    """
    B, n = pre.shape
    m = min(n, 2 * k)
    while True:
        vals, idx = kernels.topk(pre, m, bias)
        vals = vals.float()
        thr = vals.clamp_min(0).reshape(-1).topk(min(k * B, vals.numel())).values[-1]
        if m == n or not bool((vals[:, -1] >= thr).any()):
            break
        m = min(n, 2 * m)
    keep = (vals >= thr) & (vals > 0)
    width = max(1, int(keep.sum(dim=1).max()))
    vals, keep = vals[:, :width], keep[:, :width]
    return vals.masked_fill(~keep, float("-inf")), idx[:, :width], thr


class TopKSAE(nn.Module):
    """TopK SAE of width d with cfg.n_latents latents, k of them active per token (BatchTopK:
    k per token on average over a training batch, a learned threshold at inference)."""

    def __init__(
        self,
        d: int,
        cfg: SAEConfig,
        norm: InputNorm | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.d, self.cfg = d, cfg
        self.n_latents, self.k = cfg.n_latents, cfg.k
        self.k_aux = cfg.k_aux if cfg.k_aux is not None else max(1, d // 2)
        self.norm = norm or InputNorm(cfg.normalize)
        W = torch.randn(self.n_latents, d, generator=generator)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.clone())  # tied at initialisation only
        self.b_enc = nn.Parameter(torch.zeros(self.n_latents))
        self.b_pre = nn.Parameter(torch.zeros(d))
        self._pre_buffer: torch.Tensor | None = None
        if cfg.batch_topk:
            # BatchTopK's inference threshold, estimated during training (NaN until then: encode
            # falls back to the top k per token).
            self.register_buffer("threshold", torch.tensor(float("nan")))

    # Encoder and selection -----------------------------------------------------------------
    def preacts(
        self, x: torch.Tensor, with_bias: bool = True, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Dense pre-activations [B, n] of normalised x [B, d], no autograd: the step's one GEMM.

        Written into one buffer reused across calls of the same shape (the only B x n tensor).
        with_bias=False leaves b_enc out for `select(..., bias=b_enc)` to add as it reads.
        dtype: the GEMM's precision (e.g. torch.bfloat16; default the weights' dtype).
        """
        dtype = dtype or self.W_enc.dtype
        shape = (x.shape[0], self.n_latents)
        buf = self._pre_buffer
        if buf is None or buf.shape != shape or buf.device != x.device or buf.dtype != dtype:
            buf = self._pre_buffer = torch.empty(shape, device=x.device, dtype=dtype)
        return kernels.encoder_preacts(
            x.to(dtype),
            self.b_pre.to(dtype),
            self.W_enc.to(dtype),
            self.b_enc.to(dtype) if with_bias else None,
            out=buf,
        )

    def select(
        self,
        pre: torch.Tensor,
        dead_mask: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> Selection:
        """TopK (4k with multi-TopK, descending so the first k are TopK_k; BatchTopK: the top
        k B of the batch) and AuxK's choice: the top k_aux among the dead latents only.

        pre: [B, n] (any float dtype); bias: [n] still to add to pre (see `preacts`), or None.
        Cost ~B n + B n_dead. The returned pre-activations are float32.
        """
        with torch.no_grad():
            if bias is not None and kernels.topk_native(pre) is None:
                pre.add_(bias.to(pre.dtype))  # stock top-k: add it in place, no second buffer
                bias = None
            if self.cfg.batch_topk:
                vals, idx, _ = batch_topk(pre, self.k, bias)
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
    def update_threshold(self, sel: Selection, decay: float = THRESHOLD_DECAY) -> None:
        """BatchTopK: fold this batch's smallest kept activation into the inference threshold
        (an exponential moving average; the first batch sets it)."""
        kept = sel.pre[sel.pre > 0]
        if kept.numel() == 0:
            return
        low = kept.min()
        if torch.isnan(self.threshold):
            self.threshold.copy_(low)
        else:
            self.threshold.mul_(decay).add_(low, alpha=1 - decay)

    def losses(self, x: torch.Tensor, sel: Selection, dense: bool = False) -> ForwardOutput:
        """Decode the selected latents and score them. x: [B, d] normalised; O(B K d) sparse.

        On CPU float32 the native fused kernels run it; elsewhere stock ops under autograd.
        dense=True is the reference: full GEMMs with autograd, same selections.
        """
        # BatchTopK's code has a variable width; its padding slots hold pre = -inf (act 0, no gradient).
        k = sel.idx.shape[1] if self.cfg.batch_topk else self.k
        k_main = sel.idx.shape[1]
        use_aux = sel.aux_idx.shape[1] > 0
        all_idx = torch.cat([sel.idx, sel.aux_idx], dim=1) if use_aux else sel.idx
        all_pre = torch.cat([sel.pre, sel.aux_pre], dim=1) if use_aux else sel.pre
        if not dense and kernels.fused_available(x, self.W_dec, self.W_enc):
            terms = kernels.fused_losses(
                x,
                self.b_pre,
                self.W_enc,
                self.b_enc,
                self.W_dec,
                all_idx,
                all_pre,
                k,
                k_main,
                self.cfg.aux_alpha,
            )
            vals = torch.relu(sel.pre[:, :k])
            return ForwardOutput(
                sel.idx[:, :k],
                vals,
                terms.recon,
                terms.loss,
                terms.nmse,
                terms.aux_loss,
                sel.aux_idx,
            )
        acts = torch.relu(
            kernels.selected_preacts(x, self.b_pre, self.W_enc, self.b_enc, all_pre, all_idx, dense)
        )
        if self.cfg.batch_topk:  # the dense reference recomputes padding slots: zero them
            acts = acts * (all_pre > float("-inf"))
        vals = acts[:, :k]
        recon = kernels.sparse_decode(sel.idx[:, :k], vals, self.W_dec, self.b_pre, dense)
        nmse = normalized_mse(x, recon)
        loss = nmse
        if k_main > k:  # multi-TopK: L(k) + L(4k) / 8
            recon_4k = kernels.sparse_decode(
                sel.idx, acts[:, :k_main], self.W_dec, self.b_pre, dense
            )
            loss = loss + normalized_mse(x, recon_4k) / 8
        aux_loss = x.new_zeros(())
        if use_aux:
            residual = (x - recon).detach()
            aux_recon = kernels.sparse_decode(
                sel.aux_idx, acts[:, k_main:], self.W_dec, dense=dense
            )
            aux_loss = normalized_mse(residual, aux_recon).nan_to_num(0.0)
            loss = loss + self.cfg.aux_alpha * aux_loss
        return ForwardOutput(sel.idx[:, :k], vals, recon, loss, nmse, aux_loss, sel.aux_idx)

    def forward(
        self, x: torch.Tensor, dead_mask: torch.Tensor | None = None, dense: bool = False
    ) -> ForwardOutput:
        """Training pass on normalised x: [B, d]; dead_mask: [n] bool, the latents AuxK may use.

        Cost (sparse): one encoder GEMM, a top-k over [B, n], then O(B K d) (K = k, 4k with
        multi-TopK, + k_aux).
        """
        return self.losses(x, self.select(self.preacts(x), dead_mask), dense)

    def free_buffer(self) -> None:
        """Drop the [B, n] pre-activation buffer kept between training steps."""
        self._pre_buffer = None

    # Unit-norm decoder -----------------------------------------------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along the row (before the step)."""
        if self.W_dec.grad is not None:
            kernels.project_rows_(self.W_dec, self.W_dec.grad)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row to unit norm (after the step)."""
        kernels.normalize_rows_(self.W_dec)

    # Inference on raw activations ------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x_raw: torch.Tensor) -> Codes:
        """x_raw: [B, d] -> Codes(idx [B, w], vals [B, w], stats). Cost: one GEMM + top-k.

        w = k, except for a BatchTopK SAE with a threshold: every latent whose pre-activation
        reaches it is kept, w is the largest count in the batch and shorter rows are padded
        with value 0 (count active latents as vals > 0).
        """
        x, stats = self.norm.apply(x_raw.to(self.W_enc.dtype))
        pre = kernels.encoder_preacts(x, self.b_pre, self.W_enc, self.b_enc)
        if self.cfg.batch_topk and not torch.isnan(self.threshold):
            thr = self.threshold.clamp_min(0)
            width = max(1, int((pre > thr).sum(dim=1).max()))
            vals, idx = kernels.topk(pre, min(width, self.n_latents))
            return Codes(idx, torch.where(vals > thr, vals, 0.0), stats)
        vals, idx = kernels.topk(pre, self.k)
        return Codes(idx, torch.relu(vals), stats)

    @torch.no_grad()
    def decode(
        self, idx: torch.Tensor, vals: torch.Tensor, stats: NormStats | None = None
    ) -> torch.Tensor:
        """Codes -> raw reconstruction [B, d]. idx, vals: [B, k]; cost B k d.

        `stats` comes from `encode` (Codes.stats); it is required in per_token mode, where
        each token's shift and scale are not recoverable from the codes.
        """
        recon = kernels.sparse_decode(idx, vals.to(self.W_dec.dtype), self.W_dec, self.b_pre)
        return self.norm.invert(recon, stats)

    @torch.no_grad()
    def reconstruct(self, x_raw: torch.Tensor) -> torch.Tensor:
        """x_raw: [B, d] -> x_hat_raw: [B, d]."""
        return self.decode(*self.encode(x_raw))

    # Safetensors I/O -------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "d": str(self.d),
            "config": self.cfg.model_dump_json(),
            "normalization": json.dumps(self.norm.to_json()),
        }

    def to_bytes(self) -> bytes:
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        return save_tensors(tensors, metadata=self.metadata())

    def save_safetensors(self, target: str | Path | IO[bytes]) -> None:
        """Weights, config and normalisation constants in one safetensors file (no pickle)."""
        data = self.to_bytes()
        if isinstance(target, str | Path):
            Path(target).write_bytes(data)
        else:
            target.write(data)

    @classmethod
    def from_bytes(cls, data: bytes) -> TopKSAE:
        meta = safetensors_metadata(data)
        if meta.get("format") != FORMAT:
            raise ConfigError(f"not a saeflow TopK SAE file (format={meta.get('format')!r})")
        cfg = SAEConfig.model_validate_json(meta["config"])
        norm = InputNorm.from_json(json.loads(meta["normalization"]))
        sae = cls(int(meta["d"]), cfg, norm)
        sae.load_state_dict(load_tensors(data))
        return sae

    @classmethod
    def load_safetensors(cls, source: str | Path | IO[bytes] | bytes) -> TopKSAE:
        if isinstance(source, bytes):
            return cls.from_bytes(source)
        if isinstance(source, str | Path):
            return cls.from_bytes(Path(source).read_bytes())
        return cls.from_bytes(source.read())


def safetensors_metadata(data: bytes) -> dict[str, Any]:
    """The `__metadata__` of a safetensors byte string (an 8-byte length, then a JSON header)."""
    if len(data) < 8:
        raise ConfigError("safetensors data is truncated: fewer than 8 bytes")
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    return header.get("__metadata__", {})
