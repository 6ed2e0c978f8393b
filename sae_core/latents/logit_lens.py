"""The logit lens of SAE latents: the tokens each decoder direction promotes and suppresses.

A direction u [d] (a decoder row) is read out as logits W_U (g * u): g is the final norm's
elementwise weight (its gain) and W_U the unembedding (lm_head). The choice: the norm's division
by the residual's RMS (or standard deviation) depends on the whole residual stream, not on the
direction, and scales all of a token's logits by one positive factor, so it is left out (the
ranking is unchanged); so are the norm's and the unembedding's biases, which add the same logits
for every latent. A LayerNorm also centres its input, which does depend on the direction: u is
centred first. The SAE's input normalisation maps its normalised space to the raw stream by a
positive scale and a shift, so the raw-space direction is the decoder row itself.

Shapes: n latents, d model width, V vocabulary, t tokens shown per side.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm")  # HF attribute names


class Unembedding(NamedTuple):
    """What maps a residual direction to logits."""

    weight: Tensor  # [V, d] the unembedding
    gain: Tensor | None  # [d] the final norm's weight; None when the model has no final norm
    centre: bool  # the final norm is a LayerNorm (it subtracts the mean over d)

    @classmethod
    def from_model(cls, model: nn.Module) -> Unembedding:
        """From an HF causal LM: its output embeddings and its base model's final norm."""
        norm = next(
            (
                m
                for name in _FINAL_NORMS
                if isinstance(m := getattr(model.base_model, name, None), nn.Module)
            ),
            None,
        )
        gain = getattr(norm, "weight", None)
        return cls(
            model.get_output_embeddings().weight.detach().float(),
            None if gain is None else gain.detach().float(),
            isinstance(norm, nn.LayerNorm),
        )


class LogitLens(NamedTuple):
    promoted: Tensor  # [n, t] token ids, highest logit first
    promoted_logits: Tensor  # [n, t]
    suppressed: Tensor  # [n, t] token ids, lowest logit first
    suppressed_logits: Tensor  # [n, t]


@torch.no_grad()
def logit_lens(
    directions: Tensor, unembed: Unembedding, top: int, chunk: int = 256, progress: bool = False
) -> LogitLens:
    """directions: [n, d] -> the top and bottom `top` tokens of W_U (g * u) per direction.

    Cost: 2 n d V flops (one [chunk, d] x [d, V] GEMM per chunk of latents), memory chunk V.
    """
    u = directions.float()
    if unembed.centre:
        u = u - u.mean(dim=1, keepdim=True)
    if unembed.gain is not None:
        u = u * unembed.gain
    top = min(top, unembed.weight.shape[0])
    parts: list[list[Tensor]] = [[], [], [], []]
    starts = range(0, u.shape[0], chunk)
    for start in tqdm(starts, desc="logit lens", unit="chunk", disable=not progress):
        logits = u[start : start + chunk] @ unembed.weight.T  # [chunk, V]
        high, low = logits.topk(top, dim=1), logits.topk(top, dim=1, largest=False)
        for part, value in zip(
            parts, (high.indices, high.values, low.indices, low.values), strict=True
        ):
            part.append(value)
    return LogitLens(*(torch.cat(part) for part in parts))
