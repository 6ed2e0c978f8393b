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

    idx: torch.Tensor  # [B, k] (or [B, 4k] with multi-TopK), descending pre-activation
    pre: torch.Tensor  # [B, k] their pre-activations
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


class TopKSAE(nn.Module):
    """TopK SAE of width d with cfg.n_latents latents, k of them active per token."""

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

    # Encoder and selection -----------------------------------------------------------------
    def preacts(self, x: torch.Tensor) -> torch.Tensor:
        """Dense pre-activations [B, n] of normalised x [B, d], no autograd: the step's one GEMM.

        Written into one buffer reused across calls of the same shape (the only B x n tensor).
        """
        shape = (x.shape[0], self.n_latents)
        buf = self._pre_buffer
        if buf is None or buf.shape != shape or buf.device != x.device or buf.dtype != x.dtype:
            buf = self._pre_buffer = torch.empty(shape, device=x.device, dtype=x.dtype)
        return kernels.encoder_preacts(x, self.b_pre, self.W_enc, self.b_enc, out=buf)

    def select(self, pre: torch.Tensor, dead_mask: torch.Tensor | None = None) -> Selection:
        """TopK (4k with multi-TopK, descending so the first k are TopK_k) and AuxK's choice:
        the top k_aux among the dead latents only. pre: [B, n]. Cost ~B n + B n_dead."""
        k_main = 4 * self.k if self.cfg.multi_topk else self.k
        vals, idx = kernels.topk(pre, k_main)
        aux_vals, aux_idx = vals[:, :0], idx[:, :0]
        if dead_mask is not None and self.cfg.aux_alpha > 0 and bool(dead_mask.any()):
            dead = dead_mask.nonzero().squeeze(1)
            aux_vals, local = kernels.topk(pre.index_select(1, dead), min(self.k_aux, dead.numel()))
            aux_idx = dead[local]
        return Selection(idx, vals, aux_idx, aux_vals)

    def losses(self, x: torch.Tensor, sel: Selection, dense: bool = False) -> ForwardOutput:
        """Decode the selected latents and score them. x: [B, d] normalised; O(B K d) sparse.

        dense=True is the reference: full GEMMs with autograd, same selections.
        """
        k, k_main = self.k, sel.idx.shape[1]
        use_aux = sel.aux_idx.shape[1] > 0
        all_idx = torch.cat([sel.idx, sel.aux_idx], dim=1) if use_aux else sel.idx
        all_pre = torch.cat([sel.pre, sel.aux_pre], dim=1) if use_aux else sel.pre
        acts = torch.relu(
            kernels.selected_preacts(x, self.b_pre, self.W_enc, self.b_enc, all_pre, all_idx, dense)
        )
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
        """x_raw: [B, d] -> Codes(idx [B, k], vals [B, k], stats). Cost: one GEMM + top-k."""
        x, stats = self.norm.apply(x_raw.to(self.W_enc.dtype))
        pre = kernels.encoder_preacts(x, self.b_pre, self.W_enc, self.b_enc)
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
        tensors = {name: p.detach().contiguous().cpu() for name, p in self.named_parameters()}
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
