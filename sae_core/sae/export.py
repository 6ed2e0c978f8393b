"""Writing a saeflow SAE as an SAELens or sparsify folder (the formats: `sae_core.sae.formats`): a
TopK SAE (BatchTopK and Matryoshka included) in either, a transcoder in sparsify's; and reading
the saeflow SAE to export (`load_source`). Reading another library's folder is
`sae_core.sae.importer`'s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sae_core.errors import ConfigError
from sae_core.sae import MatryoshkaSAE, SparseAutoencoder, TopKSAE, load_sae_bytes
from sae_core.sae.formats import (
    CFG_FILE,
    FORMATS,
    WEIGHTS,
    Format,
    Origin,
    transformer_lens_hook,
)
from sae_core.sae.normalize import EPS
from sae_core.sae.sparsify_transcoder import to_sparsify
from sae_core.sae.transcoder import TranscoderSAE

SAELENS_LAYOUT_VERSION = "6.0.0"  # the SAELens cfg.json layout written (metadata nested)

# What a caller must do around a library's encode/decode when the library cannot normalise
# (sparsify with per_token): saeflow's per-token normalisation (sae_core.sae.normalize), exactly.
PER_TOKEN_TRANSFORM = {
    "before_encode": "x_in = (x - m) / s, where for each token x (its d values) m = mean(x) and "
    "s = max(||x - m||_2, eps)",
    "after_decode": "x_hat = decode(codes) * s + m, with the m and s of the same token",
    "eps": EPS,
    "without_it": "codes and reconstructions are wrong, silently (NMSE ~1.5 on SmolLM2)",
}
NO_TRANSFORM = "none: the normalisation is folded into the weights or done by the library"


def _saeflow_entry(sae: TopKSAE, origin: Origin, transform_needed: bool) -> dict[str, Any]:
    return {
        "normalization": sae.norm.to_json(),
        # True when the library cannot apply the normalisation itself: the caller must
        # normalise before encode and undo it after decode (sparsify with per_token).
        "caller_applies_normalization": transform_needed,
        "caller_transform": PER_TOKEN_TRANSFORM if transform_needed else NO_TRANSFORM,
        "config": sae.cfg.model_dump(mode="json"),
        "origin": origin.model_dump(),
    }


def inference_threshold(sae: TopKSAE) -> float | None:
    """The threshold `encode` keeps latents above (BatchTopK once trained), else None: the
    top k per token."""
    if not sae.cfg.batch_topk or torch.isnan(sae.threshold):
        return None
    return float(sae.threshold.clamp_min(0))


def _weights(sae: TopKSAE, scale_in: float) -> dict[str, torch.Tensor]:
    """Latent-major weights with x -> scale_in * x folded in: W_enc*s, W_dec/s, b_pre/s."""
    with torch.no_grad():
        return {
            "W_enc": (sae.W_enc * scale_in).float().contiguous(),
            "W_dec": (sae.W_dec / scale_in).float().contiguous(),
            "b_enc": sae.b_enc.float().contiguous(),
            "b_dec": (sae.b_pre / scale_in).float().contiguous(),
        }


def check_format(fmt: str) -> None:
    """Raise unless `fmt` is a format export writes (checked before any SAE is fetched)."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format '{fmt}': choose one of {', '.join(FORMATS)}")


def export_sae(
    sae: SparseAutoencoder, out: Path, fmt: Format, origin: Origin | None = None
) -> list[Path]:
    """Write the TopK SAE `sae` into folder `out` in format `fmt`; returns the files written."""
    check_format(fmt)
    if isinstance(sae, TranscoderSAE):
        return _export_transcoder(sae, out, fmt, origin or Origin())
    if not isinstance(sae, TopKSAE):
        raise ConfigError(
            f"export: SAELens and sparsify hold TopK SAEs only, this one is sae.kind="
            f"{sae.cfg.kind}; ship its saeflow .safetensors file (compact, no pickle) instead"
        )
    threshold = inference_threshold(sae)
    if threshold is not None and fmt == "sparsify":
        raise ConfigError(
            f"export: sparsify has no inference threshold for this BatchTopK SAE (sae.kind="
            f"{sae.cfg.kind}); export --format saelens (its JumpReLU layout) instead"
        )
    origin = origin or Origin()
    mode, d = sae.norm.mode, sae.d
    if mode == "global":
        scale_in = sae.norm.global_scale
    elif mode == "per_token" and fmt == "saelens":
        scale_in = 1.0 / math.sqrt(d - 1)  # layer_norm's input is sqrt(d-1) x saeflow's
    else:
        scale_in = 1.0
    w = _weights(sae, scale_in)
    entry = _saeflow_entry(sae, origin, mode == "per_token" and fmt == "sparsify")
    if fmt == "saelens":
        tensors = {
            "W_enc": w["W_enc"].T.contiguous(),
            "W_dec": w["W_dec"],
            "b_enc": w["b_enc"],
            "b_dec": w["b_dec"],
        }
        selection: dict[str, Any] = {"architecture": "topk", "k": sae.k}
        if threshold is not None:
            selection = {"architecture": "jumprelu"}
            tensors["threshold"] = torch.full((sae.n_latents,), threshold)
        if isinstance(sae, MatryoshkaSAE):
            selection["matryoshka_widths"] = list(sae.sizes)
        cfg = {
            "architecture": selection.pop("architecture"),
            "d_in": d,
            "d_sae": sae.n_latents,
            **selection,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "layer_norm" if mode == "per_token" else "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": origin.model,
                "hook_name": transformer_lens_hook(origin.hook),
                "hook_head_index": None,
                "context_size": origin.context_size,
                # Positions it was trained on, as SAELens' slice(*seqpos_slice): [1, None]
                # when position 0 (the attention sink) was left out.
                "seqpos_slice": [1, None] if origin.skip_first_position else [None],
                "prepend_bos": False,
                "sae_lens_version": SAELENS_LAYOUT_VERSION,
                "sae_lens_training_version": None,
            },
            "saeflow": entry,
        }
    else:
        tensors = {
            "encoder.weight": w["W_enc"],
            "encoder.bias": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        }
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, sae.n_latents // d),
            "normalize_decoder": mode != "global",  # folding scales the decoder rows by 1/g
            "num_latents": sae.n_latents,
            "k": sae.k,
            "multi_topk": sae.cfg.multi_topk,
            "skip_connection": False,
            "transcode": False,
            "d_in": d,
            "saeflow": entry,
        }
    return _write_folder(out, fmt, cfg, tensors)


def _write_folder(
    out: Path, fmt: Format, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS[fmt]
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(weights))
    # safetensors writes owner-only (0600) files; the weights get cfg.json's mode (the
    # umask's, 0644 by default) so whoever may read the config may read the weights.
    weights.chmod((out / CFG_FILE).stat().st_mode & 0o777)
    return [out / CFG_FILE, weights]


def _export_transcoder(tc: TranscoderSAE, out: Path, fmt: Format, origin: Origin) -> list[Path]:
    """A transcoder in sparsify's format (`sae_core.sae.sparsify_transcoder`); SAELens only
    loads transcoders, in a layout of its own, so it is not written."""
    if fmt != "sparsify":
        raise ConfigError(
            f"export: sae.kind={tc.cfg.kind} is exported in sparsify's format only "
            "(its transcode / skip_connection options); use --format sparsify"
        )
    if tc.cfg.batch_topk:
        raise ConfigError(
            "export: sparsify has no BatchTopK inference threshold; ship this transcoder's "
            "saeflow .safetensors file instead"
        )
    cfg, tensors = to_sparsify(tc)
    entry = _saeflow_entry(tc, origin, False)
    entry["out_normalization"] = tc.out_norm.to_json()
    return _write_folder(out, fmt, cfg | {"saeflow": entry}, tensors)


def load_source(source: str) -> tuple[SparseAutoencoder, Origin]:
    """A saeflow SAE to export: a `.safetensors` file it wrote, or an SAE dataset on a store
    (`STORE/sae/FINGERPRINT`, local or s3://), whose lineage names the model and hook."""
    from sae_core.sae import load_sae
    from sae_core.storage.lineage import sae_lineage
    from sae_core.storage.refs import committed_dataset

    if source.endswith(".safetensors"):
        if not Path(source).is_file():
            raise ConfigError(f"export source {source}: no such file")
        return load_sae_bytes(Path(source).read_bytes()), Origin()
    ref = committed_dataset(source, "sae")
    if ref is None:
        raise ConfigError(
            f"export source {source}: not a saeflow .safetensors file or a committed "
            "STORE/sae/FINGERPRINT dataset; or give models:/NAME@ALIAS"
        )
    return load_sae(ref), Origin.of(sae_lineage(ref))
