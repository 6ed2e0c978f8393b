"""A transcoder in the evaluation loop: its codes come from its input hook, its prediction
replaces its output hook's activation.

`evaluate.evaluate_sae` cuts the model at the output hook (the activation spliced) as for an SAE;
this reads the input hook on the same contexts and runs the transcoder on it. The input hook fires
before the output hook (`models.check_transcoder_hooks`), so the clean input is the input the
spliced forward sees: the splice of an exact transcoder is the clean model.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor, nn

from sae_core.data.models import HookPoint, run_to_hook
from sae_core.sae.base import Codes
from sae_core.sae.normalize import NormStats
from sae_core.sae.transcoder import TranscoderSAE


class Transcoded(NamedTuple):
    """A transcoder's output for a batch of tokens."""

    codes: Codes
    """Its latents on the input hook's activations: idx, vals [N, k]."""
    output: Tensor
    """Its prediction of the output hook, raw [N, d]: what is spliced in."""
    stats: NormStats
    """The output's normalisation (shift, scale): the space its NMSE is measured in."""


def transcode(
    tc: TranscoderSAE,
    model: nn.Module,
    input_ids: Tensor,
    hook_in: HookPoint,
    first_position: int,
    target: Tensor,
) -> Transcoded:
    """The transcoder on the input hook's activations of `input_ids` [B, T], positions from
    `first_position` on (N = B (T - first_position) tokens, in the order of `target` [N, d],
    the output hook's activations). Cost: the model up to the input hook, and the transcoder."""
    x = run_to_hook(model, input_ids, hook_in)[:, first_position:]
    x = x.reshape(-1, x.shape[-1]).float()
    return Transcoded(tc.encode(x), tc.reconstruct(x), tc.out_norm.apply(target)[1])
