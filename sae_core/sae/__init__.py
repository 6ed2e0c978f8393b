"""Sparse autoencoders. Public API:

- `TopKSAE(d, cfg: SAEConfig, norm: InputNorm | None = None)`: the Gao et al. TopK SAE.
  - `forward(x_norm [B, d], dead_mask=None) -> ForwardOutput(latent_idx, latent_vals, recon,
    loss, nmse, aux_loss)`: training pass on *normalised* inputs (`sae.norm.apply(x_raw)[0]`).
  - `encode(x_raw [B, d]) -> Codes(idx [B, k], vals [B, k], stats)`; `decode(idx, vals, stats)`
    -> raw [B, d]; `sae.decode(*sae.encode(x))` round-trips (stats carry per-token shift and
    scale, required in per_token mode); `reconstruct(x_raw) -> x_hat_raw`.
  - `save_safetensors(path | fileobj)`, `TopKSAE.load_safetensors(path | fileobj | bytes)`:
    weights + config + normalisation constants in one safetensors file, no pickle.
  - attributes: d, n_latents, k, k_aux, cfg, norm (InputNorm).
- `load_sae(ref: DatasetRef) -> TopKSAE`: the `sae.safetensors` of a committed sae dataset.
- Training lives in `sae_core.train.train_sae`; kernels in `sae_core.sae.kernels`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_core.sae.topk import Codes, ForwardOutput, TopKSAE

if TYPE_CHECKING:
    from sae_core.refs import DatasetRef

WEIGHTS_FILE = "sae.safetensors"


def load_sae(ref: DatasetRef) -> TopKSAE:
    """The trained SAE stored in a committed sae dataset."""
    return TopKSAE.from_bytes(ref.open_store().read_bytes(f"{ref.path}/{WEIGHTS_FILE}"))


__all__ = ["Codes", "ForwardOutput", "TopKSAE", "WEIGHTS_FILE", "load_sae"]
