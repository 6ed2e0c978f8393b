"""Transcoders in EleutherAI sparsify's format (its `transcode` and `skip_connection` options):
the conversions both ways; `sae_core.sae.export` writes the folder, `sae_core.sae.importer`
reads it.

sparsify's transcoder maps the input hook's raw x to the output hook's y as
  z = TopK(ReLU(x encoder.weight^T + encoder.bias)),  y_hat = z W_dec + b_dec (+ x W_skip^T),
with no input centring (transcode=True skips subtracting b_dec) and no normalisation. saeflow's
(`sae_core.sae.transcoder`) normalises x by g_x and y by g_y (global scalars, or 1) and centres
x by b_pre; all of it folds into the weights:
  encoder.weight = g_x W_enc,  encoder.bias = b_enc - W_enc b_pre,
  W_dec = W_dec / g_y,  b_dec = b_dec / g_y,  W_skip = (g_x / g_y) W_skip.
Same latents, same raw-space output; the folded decoder rows are unit-norm only when g_y = 1
(cfg `normalize_decoder`).
"""

from __future__ import annotations

from typing import Any

import torch

from sae_core.config import SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae.normalize import InputNorm
from sae_core.sae.transcoder import SkipTranscoderSAE, TranscoderSAE

# The tensors of a sparsify transcoder beyond an SAE's (encoder.weight, encoder.bias, W_dec, b_dec).
SKIP_TENSOR = "W_skip"


def _scale(norm: InputNorm) -> float:
    return norm.global_scale if norm.mode == "global" else 1.0


def to_sparsify(tc: TranscoderSAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(sparsify's cfg.json fields, its tensors) for the transcoder, its normalisation folded in."""
    g_x, g_y = _scale(tc.norm), _scale(tc.out_norm)
    with torch.no_grad():
        tensors = {
            "encoder.weight": tc.W_enc * g_x,
            "encoder.bias": tc.b_enc - tc.W_enc @ tc.b_pre,
            "W_dec": tc.W_dec / g_y,
            "b_dec": tc.b_dec / g_y,
        }
        if tc.SKIP:
            tensors[SKIP_TENSOR] = tc.W_skip * (g_x / g_y)
    cfg = {
        "activation": "topk",
        "expansion_factor": max(1, tc.n_latents // tc.d),
        "normalize_decoder": g_y == 1.0,
        "num_latents": tc.n_latents,
        "k": tc.k,
        "multi_topk": tc.cfg.multi_topk,
        "skip_connection": tc.SKIP,
        "transcode": True,
        "d_in": tc.d,
    }
    return cfg, {name: t.float().contiguous() for name, t in tensors.items()}


def from_sparsify(
    cfg: dict[str, Any], tensors: dict[str, torch.Tensor], saeflow: dict[str, Any] | None
) -> TranscoderSAE:
    """A sparsify transcoder's tensors as a saeflow transcoder: unfolded again when `saeflow`
    (cfg.json's "saeflow" entry, written by `to_sparsify`'s caller) gives the normalisation
    and config, else with no normalisation and no input centre."""
    skip = bool(cfg.get("skip_connection"))
    if skip != (SKIP_TENSOR in tensors):
        raise ConfigError(
            f"cfg.json: skip_connection={skip} but the weights {'lack' if skip else 'hold'} "
            f"{SKIP_TENSOR}; fix cfg.json or the weights"
        )
    n, d = tensors["encoder.weight"].shape
    if skip and tuple(tensors[SKIP_TENSOR].shape) != (d, d):
        raise ConfigError(
            f"{SKIP_TENSOR} has shape {list(tensors[SKIP_TENSOR].shape)}, expected [{d}, {d}] "
            "(d_out x d_in); re-export the transcoder"
        )
    kind = "skip_transcoder" if skip else "transcoder"
    sae_cfg = SAEConfig(kind=kind, n_latents=n, k=cfg["k"], normalize="none")
    norm = out_norm = InputNorm("none")
    if saeflow:
        sae_cfg = SAEConfig.model_validate(saeflow["config"])
        norm = InputNorm.from_json(saeflow["normalization"])
        out_norm = InputNorm.from_json(saeflow["out_normalization"])
    g_x, g_y = _scale(norm), _scale(out_norm)
    cls = SkipTranscoderSAE if skip else TranscoderSAE
    tc = cls(d, sae_cfg, norm, out_norm=out_norm)
    state = {
        "W_enc": tensors["encoder.weight"] / g_x,
        "b_enc": tensors["encoder.bias"],
        "b_pre": torch.zeros(d),  # folded into b_enc on export
        "W_dec": tensors["W_dec"] * g_y,
        "b_dec": tensors["b_dec"] * g_y,
    }
    if skip:
        state[SKIP_TENSOR] = tensors[SKIP_TENSOR] * (g_y / g_x)
    tc.load_state_dict(state)
    return tc
