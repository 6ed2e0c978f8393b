"""SAEBench's core metrics (`saebench_core`) of a transcoder, scored on its own task.

A transcoder's reconstruction target is not its input: its latents read model.hook's x and it
predicts model.hook_out's y. So on the eval split's paired rows (x read on the contexts, as the
evaluation does through `transcode`; y from the eval set's baseline at the output hook)
explained_variance, cossim and l2_ratio compare y with the prediction y_hat (the skip path
included); alive_fraction and the firing fractions count the latents computed from x; the
decoder cosines are those of the decoder directions, which live in y's space.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_core import stopping
from sae_core.data.models import HookPoint
from sae_core.evaluation.saebench_core import CoreStats, decoder_metrics
from sae_core.evaluation.transcode import transcode
from sae_core.sae.transcoder import TranscoderSAE


def transcoder_core_metrics(
    tc: TranscoderSAE,
    model: nn.Module,
    contexts: Tensor,
    targets: Tensor,
    hook_in: HookPoint,
    first_position: int,
    batch_contexts: int,
    decoder_sample: int,
    seed: int = 0,
) -> dict[str, float]:
    """The core metrics of `tc` predicting the output hook (see the module).

    contexts: [C, T] token ids; targets: [C, T, d] the output hook's activations on them (the
    baseline's); scored from `first_position` on. `tc` and `model` on one device.
    Cost: the model up to hook_in and the transcoder on every eval token.
    """
    stats = CoreStats(tc.n_latents)
    device = next(model.parameters()).device
    width = targets.shape[-1]
    with torch.inference_mode():
        for start in range(0, contexts.shape[0], batch_contexts):
            stopping.check()
            stop = start + batch_contexts
            y = targets[start:stop, first_position:].reshape(-1, width).to(device).float()
            out = transcode(tc, model, contexts[start:stop].to(device), hook_in, first_position, y)
            stats.update(y, out.output, out.codes.idx, out.codes.vals)
    return stats.result() | decoder_metrics(tc, decoder_sample, seed)
