"""Run saeflow's exports with the real SAELens and sparsify (in their own venv, where saeflow is
not installed): `python peer_export_worker.py IN.safetensors FOLDER...`, each FOLDER named
`<format>-<anything>`.

Reads activations `x` [B, d] and writes, as FOLDER.out.safetensors, the dense latents and
reconstructions the library computes (one process: importing SAELens costs seconds). A sparsify folder whose cfg.json says the caller applies the normalisation gets the
transform stated there (`saeflow.caller_transform`), and also the bare library's output
(`*_bare`): what a user who skips it gets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def per_token(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cfg.json's before_encode: (x - m) / s with m the token's mean, s = max(||x - m||, eps)."""
    m = x.mean(dim=-1, keepdim=True)
    s = (x - m).norm(dim=-1, keepdim=True).clamp_min(eps)
    return (x - m) / s, m, s


def run_saelens(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder), device="cpu")
    with torch.no_grad():
        latents = sae.encode(x)
        latents = latents.to_dense() if latents.is_sparse else latents
        return {"latents": latents, "recon": sae.decode(latents)}


def run_sparsify(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sparsify import SparseCoder

    sae = SparseCoder.load_from_disk(folder, device="cpu")
    entry = json.loads((folder / "cfg.json").read_text())["saeflow"]

    def codec(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = sae.encode(inputs)
            dense = torch.zeros(inputs.shape[0], sae.num_latents)
            dense.scatter_(1, out.top_indices, out.top_acts.float())
            return dense, sae.decode(out.top_acts, out.top_indices)

    bare_latents, bare_recon = codec(x)
    result = {"latents_bare": bare_latents, "recon_bare": bare_recon}
    if entry["caller_applies_normalization"]:
        x_in, m, s = per_token(x, entry["caller_transform"]["eps"])
        latents, recon = codec(x_in)
        result |= {"latents": latents, "recon": recon * s + m}
    else:
        result |= {"latents": bare_latents.clone(), "recon": bare_recon.clone()}
    return result


if __name__ == "__main__":
    inputs, *folders = sys.argv[1:]
    x = load_file(inputs)["x"]
    for folder in map(Path, folders):
        run = run_saelens if folder.name.startswith("saelens") else run_sparsify
        result = {k: v.contiguous() for k, v in run(folder, x).items()}
        save_file(result, str(folder.with_suffix(".out.safetensors")))
