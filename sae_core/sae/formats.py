"""SAELens and EleutherAI sparsify on-disk formats: what saeflow writes (`sae_core.sae.export`)
and reads (`sae_core.sae.importer`) in both, the file names, an SAE's origin and the hook names of
each convention; transcoders and skip transcoders in sparsify's format (`sparsify_transcoder`).

SAELens (>= 6): a folder with `cfg.json` (architecture "topk", d_in, d_sae, k,
normalize_activations, apply_b_dec_to_input, metadata{model_name, hook_name, ...}) and
`sae_weights.safetensors` (W_enc [d, n], W_dec [n, d], b_enc [n], b_dec [d]). Its encoder
computes TopK then ReLU of (norm_in(x) - b_dec) W_enc + b_enc; the decoder z W_dec + b_dec,
then norm_out.

A BatchTopK SAE with its inference threshold (Matryoshka BatchTopK too) is written as SAELens
saves its own BatchTopK and MatryoshkaBatchTopK SAEs for inference: architecture "jumprelu"
(no k) and a `threshold` [n] tensor holding the one threshold for every latent; its encoder
keeps ReLU(pre) where pre > threshold, as saeflow's does. A Matryoshka SAE's cfg.json also
states its nesting as SAELens' training config names it, `matryoshka_widths` (the prefix
sizes; SAELens' inference classes ignore the key). sparsify has no threshold: such an SAE is
refused there rather than exported with other codes.

sparsify: a folder (one per hookpoint) with `cfg.json` (activation "topk", num_latents, k,
d_in, ...) and `sae.safetensors` (encoder.weight [n, d], encoder.bias [n], W_dec [n, d],
b_dec [d]). Its encoder is ReLU then TopK of (x - b_dec) encoder.weight^T + encoder.bias:
the same codes as TopK then ReLU. It has no input normalisation.

Normalisation, so that the exported SAE maps raw activations as saeflow does:
- global (x_norm = g x) is folded into the weights of both formats: W_enc * g, W_dec / g,
  b_dec = b_pre / g. Same latents, raw-space reconstruction, no runtime transform.
- per_token (centre each token, scale it to unit norm) is SAELens' "layer_norm" (centre,
  divide by the unbiased std + 1e-5, undo on the way out) with sqrt(d - 1) folded into the
  weights, because ||x - mean|| = sqrt(d - 1) std. Equal to saeflow's up to that 1e-5, a
  relative 1e-5 / std (1e-6 on SmolLM's residual stream). sparsify cannot express it: the
  weights are exported unfolded and cfg.json's "saeflow" entry states the transform exactly
  (`caller_transform`), which `import_sae` applies and a plain sparsify user must apply around
  encode/decode. No fold exists: each token is divided by its own norm, which no linear
  layer (nor sparsify's fixed biases) can express.
Both cfg.json files carry a top-level "saeflow" entry (normalisation, full SAE config, origin)
that the other libraries ignore and that makes the round trip exact.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

if TYPE_CHECKING:
    from sae_core.storage.lineage import Lineage

Format = Literal["saelens", "sparsify"]
FORMATS: tuple[Format, ...] = ("saelens", "sparsify")
CFG_FILE = "cfg.json"
WEIGHTS = {"saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}
ORIGIN_FILE = "origin.json"  # written next to the weights of a registered model

# saeflow hook kind <-> TransformerLens hook name (SAELens' convention).
_TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
_TL_PATTERN = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


class Origin(BaseModel):
    """What an SAE was trained on, as far as it is known."""

    model: str | None = None  # a hub id where known (`saeflow export` maps demo assets to theirs)
    hook: str | None = None  # saeflow naming, e.g. resid_post.15
    context_size: int | None = None
    skip_first_position: bool | None = None  # trained without position 0 of each context

    @classmethod
    def of(cls, lineage: Lineage) -> Origin:
        """The origin a `sae_core.storage.lineage.Lineage` records."""
        return cls(
            model=lineage.model,
            hook=lineage.hook,
            context_size=lineage.context_len,
            skip_first_position=lineage.skip_first_position,
        )


def transformer_lens_hook(hook: str | None) -> str | None:
    """`resid_post.15` -> `blocks.15.hook_resid_post` (None when there is no equivalent)."""
    kind, _, layer = (hook or "").partition(".")
    return f"blocks.{layer}.{_TL_HOOKS[kind]}" if kind in _TL_HOOKS and layer.isdigit() else None


def saeflow_hook(name: str | None) -> str | None:
    """The inverse of transformer_lens_hook; `layers.15` (sparsify's name) -> resid_post.15."""
    if name and (m := _TL_PATTERN.match(name)):
        kind = next((k for k, v in _TL_HOOKS.items() if v == m[2]), None)
        return f"{kind}.{m[1]}" if kind else None
    if name and (m := re.fullmatch(r"(?:model\.)?layers\.(\d+)", name)):
        return f"resid_post.{m[1]}"
    return None
