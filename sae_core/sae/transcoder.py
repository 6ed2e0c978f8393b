"""Transcoders and skip transcoders: TopK latents of one hook's activation x that reconstruct
another hook's activation y (e.g. the MLP's input and output of one layer; arXiv 2501.18823).

z = ReLU(TopK_k(W_enc (x - b_pre) + b_enc)),  y_hat = W_dec^T z + b_dec (+ W_skip x),
on normalised x and y. The encoder, the selection, AuxK and the sparse decoder are the TopK
SAE's (`sae_core.sae.topk`, the same O(B k d) gather-sum); what differs is the target (y, not
x), the output bias b_dec and, for the skip transcoder, the learned linear path W_skip
[d_out, d_in] from input to output, zero at initialisation. AuxK reconstructs the residual of y.

Both hooks come from one model, so d_in = d_out = d. Each side has its own normalisation: x by
`norm` (cfg.normalize), y by `out_norm` (the same mode, fitted on y); per_token is refused (a
token's output scale cannot be predicted from its input). A training batch is [B, 2d]: x then y
(`split_batch`), the row pairs of the two hooks' datasets (`sae_core.storage.loader`).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae_core.config import SAEConfig
from sae_core.sae.base import ForwardOutput, Selection
from sae_core.sae.normalize import InputNorm, NormStats
from sae_core.sae.ranks import Ranks
from sae_core.sae.topk import TopKSAE


class TranscoderSAE(TopKSAE):
    """A transcoder of width d: TopK latents of x [B, d] reconstructing y [B, d]."""

    FORMAT = "saeflow.transcoder"
    KIND = "transcoder"
    SKIP: ClassVar[bool] = False

    def __init__(
        self,
        d: int,
        cfg: SAEConfig,
        norm: InputNorm | None = None,
        generator: torch.Generator | None = None,
        out_norm: InputNorm | None = None,
    ):
        super().__init__(d, cfg, norm, generator)
        self.out_norm = out_norm or InputNorm(self.norm.mode)
        self.b_dec = nn.Parameter(torch.zeros(d))
        if self.SKIP:
            self.W_skip = nn.Parameter(torch.zeros(d, d))  # [d_out, d_in]

    def output(self, x: Tensor, idx: Tensor, vals: Tensor, dense: bool = False) -> Tensor:
        """y_hat [B, d] (normalised) = the latents' sparse decode + b_dec (+ x W_skip^T)."""
        y = self.sparse_decode(idx, vals, self.b_dec, dense)
        return y + x @ self.W_skip.T if self.SKIP else y

    def split_batch(self, batch: Tensor) -> tuple[Tensor, Tensor | None]:
        """[B, 2d] (x then y, raw) -> (x raw [B, d], y normalised [B, d])."""
        if batch.shape[1] != 2 * self.d:
            raise ValueError(
                f"a transcoder batch holds x and y side by side: [B, {2 * self.d}], "
                f"got {list(batch.shape)}"
            )
        return batch[:, : self.d], self.out_norm.apply(batch[:, self.d :])[0]

    def fused_losses(
        self, x: Tensor, sel: Selection, ranks: Ranks, with_recon: bool, centred: bool
    ) -> ForwardOutput | None:
        """None: the native fused loss reconstructs its input; a transcoder's target is y."""
        return None

    @torch.no_grad()
    def decode(self, idx: Tensor, vals: Tensor, stats: NormStats | None = None) -> Tensor:
        """The latents' part of the output, raw [B, d]: W_dec^T z + b_dec, without the skip path
        (which needs x: `reconstruct`). stats: unused (the output's normalisation is global)."""
        y = self.sparse_decode(idx, vals.to(self.b_dec.dtype), self.b_dec)
        return self.out_norm.invert(y)

    @torch.no_grad()
    def reconstruct(self, x_raw: Tensor) -> Tensor:
        """The transcoder's prediction of the output hook, raw [B, d], from x_raw [B, d]."""
        x, _ = self.norm.apply(x_raw.to(self.b_pre.dtype))
        idx, vals, _ = self.encode(x_raw)
        return self.out_norm.invert(self.output(x, idx, vals))

    @torch.no_grad()
    def fit_output(self, y_sample: Tensor) -> None:
        """Fit the output's normalisation on raw y [N, d] and start b_dec at its normalised mean."""
        self.out_norm = InputNorm.fit(self.norm.mode, y_sample)
        self.b_dec.copy_(self.out_norm.apply(y_sample.float())[0].mean(dim=0))

    # Safetensors I/O -------------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return super().metadata() | {"out_normalization": json.dumps(self.out_norm.to_json())}

    @classmethod
    def init_from_metadata(cls, meta: dict[str, str]) -> dict[str, Any]:
        return {"out_norm": InputNorm.from_json(json.loads(meta["out_normalization"]))}


class SkipTranscoderSAE(TranscoderSAE):
    """A transcoder with a learned linear skip path W_skip [d_out, d_in] from x to y."""

    FORMAT = "saeflow.skip_transcoder"
    KIND = "skip_transcoder"
    SKIP = True
