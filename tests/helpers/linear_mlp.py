"""A model whose MLP a skip transcoder can predict exactly: the tiny Llama with one block's MLP
replaced by an affine map, and skip transcoders built around such a map."""

from __future__ import annotations

import torch
from torch import nn

from sae_core.config import SAEConfig
from sae_core.data.models import decoder_layers
from sae_core.sae import SkipTranscoderSAE, build_sae
from tests.helpers.tiny_models import build_tiny_llama


def linear_mlp_llama(layer: int) -> nn.Module:
    """The tiny Llama (width 64) with block `layer`'s MLP an affine map y = A x + c, large enough
    that removing it changes the model's predictions."""
    model = build_tiny_llama()
    torch.manual_seed(5)
    mlp = nn.Linear(64, 64)
    with torch.no_grad():
        mlp.weight.normal_(0, 1)
    decoder_layers(model)[layer].mlp = mlp
    return model.eval()


def skip_transcoder(weight: torch.Tensor, bias: torch.Tensor) -> SkipTranscoderSAE:
    """A skip transcoder whose skip path is the affine map (weight [64, 64], bias [64]) and
    whose latents never fire."""
    tc = build_sae(64, SAEConfig(kind="skip_transcoder", n_latents=128, k=8, normalize="none"))
    with torch.no_grad():
        tc.W_skip.copy_(weight)
        tc.b_dec.copy_(bias)
        tc.b_enc.fill_(-1e4)
    return tc.eval()
