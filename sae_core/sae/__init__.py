"""Sparse autoencoders: the kinds, their normalisation (normalize), the reductions over a
data-parallel batch (ranks), the sparse step's kernels (kernels, fused_loss and unit_adam: the
Python face; native: the build of csrc/*.cpp), orthogonal matching pursuit (omp) and the
SAELens / sparsify formats (formats; export writes them, importer reads them). May import:
storage and the leaves. Public API:

- `SparseAutoencoder`: what every kind provides (`sae_core.sae.base`); the kinds (cfg.kind):
  - `TopKSAE(d, cfg, norm=None, generator=None)`: the Gao et al. TopK SAE, dense W_enc, W_dec.
  - `ExpanderSAE(d, cfg, norm=None, generator=None)`: the decoder masked by a random expander
    graph, stored compactly (rows, values) with cfg.degree non-zeros per latent.
  - `MatryoshkaSAE(d, cfg, norm=None, generator=None)`: TopK's weights, trained (BatchTopK by
    default) on the summed losses of nested prefixes of the dictionary (`sizes`).
  - `TranscoderSAE`, `SkipTranscoderSAE` (`sae_core.sae.transcoder`): TopK latents of one hook
    reconstructing another (+ a linear skip path); trained on [B, 2d] batches (x then y,
    `split_batch`), `reconstruct(x_raw)` is the predicted output.
- Every kind:
  - `forward(x_norm [B, d], dead_mask=None) -> ForwardOutput(latent_idx, latent_vals, recon,
    loss, nmse, aux_loss)`: training pass on *normalised* inputs (`sae.norm.apply(x_raw)[0]`).
  - `encode(x_raw [B, d]) -> Codes(idx [B, k], vals [B, k], stats)`; `decode(idx, vals, stats)`
    -> raw [B, d]; `sae.decode(*sae.encode(x))` round-trips (stats carry per-token shift and
    scale, required in per_token mode); `reconstruct(x_raw) -> x_hat_raw`;
    `omp_encode(x_raw, k=None) -> Codes`: orthogonal matching pursuit over the decoder.
  - `dense_decoder() -> [n, d]`, `encoder_matrix() -> [n, d]`: the dense equivalents.
  - `save_safetensors(path | fileobj)`, `to_bytes()`, `Kind.load_safetensors(...)`: weights +
    config + normalisation constants in one safetensors file, no pickle.
  - attributes: d, n_latents, k, k_aux, cfg, norm (InputNorm).
- `build_sae(d, cfg, norm=None, generator=None)`: the kind cfg.kind names.
- `load_sae_bytes(data)`: any kind's safetensors file; `load_sae(ref: DatasetRef)`: the
  `sae.safetensors` of a committed sae dataset.
- `storage_report(sae) -> dict`: learned decoder values and artifact bytes against the dense
  TopK equivalent.
- Training lives in `sae_core.training`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sae_core.config import SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae.base import Codes, ForwardOutput, SparseAutoencoder
from sae_core.sae.expander import ExpanderSAE
from sae_core.sae.matryoshka import MatryoshkaSAE
from sae_core.sae.normalize import InputNorm
from sae_core.sae.safetensors_io import safetensors_metadata
from sae_core.sae.topk import TopKSAE
from sae_core.sae.transcoder import SkipTranscoderSAE, TranscoderSAE

if TYPE_CHECKING:
    from sae_core.storage.refs import DatasetRef

WEIGHTS_FILE = "sae.safetensors"
KINDS: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "expander": ExpanderSAE,
    "matryoshka": MatryoshkaSAE,
    "transcoder": TranscoderSAE,
    "skip_transcoder": SkipTranscoderSAE,
}


def build_sae(
    d: int,
    cfg: SAEConfig,
    norm: InputNorm | None = None,
    generator: torch.Generator | None = None,
) -> SparseAutoencoder:
    """A fresh SAE of the kind cfg.kind names, its weights drawn from `generator`."""
    return KINDS[cfg.kind](d, cfg, norm, generator)


def load_sae_bytes(data: bytes) -> SparseAutoencoder:
    """Any kind's safetensors file, by its `format` metadata."""
    fmt = safetensors_metadata(data).get("format")
    kind = next((cls for cls in KINDS.values() if cls.FORMAT == fmt), None)
    if kind is None:
        known = ", ".join(cls.FORMAT for cls in KINDS.values())
        raise ConfigError(f"not a saeflow SAE file (format={fmt!r}; expected one of {known})")
    return kind.from_bytes(data)


def load_sae(ref: DatasetRef) -> SparseAutoencoder:
    """The trained SAE stored in a committed sae dataset."""
    return load_sae_bytes(ref.open_store().read_bytes(f"{ref.path}/{WEIGHTS_FILE}"))


def storage_report(sae: SparseAutoencoder) -> dict[str, Any]:
    """What the decoder and the shipped artifact cost against the dense TopK SAE of the same
    n and d (W_enc and W_dec dense float32).

    decoder_values: learned decoder values (n degree; n d for TopK); dense_decoder_values: n d;
    compression: d / degree; artifact_bytes: len(sae.to_bytes()); dense_artifact_bytes: that
    file with its weight tensors replaced by the dense TopK ones (exact up to the header's
    tensor names and shapes, tens of bytes). Cost: one serialisation of the SAE.
    """
    degree = sae.degree if isinstance(sae, ExpanderSAE) else sae.d
    n, d = sae.n_latents, sae.d
    artifact = len(sae.to_bytes())
    payload = sum(t.nbytes for t in sae.state_dict().values())
    biases = sae.b_enc.nbytes + sae.b_pre.nbytes
    threshold = sae.threshold.nbytes if sae.cfg.batch_topk else 0
    # A transcoder's output bias and skip path: the same in both.
    output = sum(t.nbytes for name, t in sae.state_dict().items() if name in ("b_dec", "W_skip"))
    dense_payload = 2 * n * d * 4 + biases + threshold + output
    return {
        "decoder_values": n * degree,
        "dense_decoder_values": n * d,
        "compression": d / degree,
        "artifact_bytes": artifact,
        "dense_artifact_bytes": artifact - payload + dense_payload,
    }


__all__ = [
    "Codes",
    "ExpanderSAE",
    "ForwardOutput",
    "KINDS",
    "MatryoshkaSAE",
    "SparseAutoencoder",
    "SkipTranscoderSAE",
    "TopKSAE",
    "TranscoderSAE",
    "WEIGHTS_FILE",
    "build_sae",
    "load_sae",
    "load_sae_bytes",
    "storage_report",
]
