"""The unit-norm decoder's Adam step in one native pass (CPU float32), and the copy of W in
16-column panels that pass leaves for the fused decoder.

W, G, exp_avg, exp_avg_sq: [n, d]. `adam_unit_rows_` projects G onto each row's tangent space,
updates Adam's moments and W, and renormalises W's rows: ~20 flops per element, reading 4
[n, d] matrices and writing 3 once (where the three steps apart read 8 and write 6). While it
holds W's rows it also writes W's panels [ceil(d / 16), n, 16], which `fused_loss`'s decoder
takes (`packed`) instead of packing W itself, as long as W is unchanged since.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sae_core.sae import kernels, native


class _Panels(NamedTuple):
    """W in panels [P, n, 16] as `adam_unit_rows_` left it, and what identifies that W."""

    version: int  # W._version then: an in-place change of W bumps it
    data_ptr: int  # new data (`.to`, `.data =`) moves it, without a version bump...
    storage: torch.UntypedStorage  # ...as long as the old storage, held here, keeps its address
    panels: torch.Tensor


_PANELS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # W -> _Panels


def packed(W: torch.Tensor) -> torch.Tensor:
    """W's panels from its last `adam_unit_rows_` while W is unchanged since, else an empty
    tensor (the decoder then packs W itself)."""
    entry = _PANELS.get(W)
    if entry is None or (entry.version, entry.data_ptr) != (W._version, W.data_ptr()):
        return W.new_empty(0)
    return entry.panels


@torch.no_grad()
def adam_unit_rows_(
    W: torch.Tensor,
    G: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> None:
    """Adam on unit-norm rows, in place: project G onto each row's tangent space, update the
    moments and W as Adam does (bias-corrected, `step` counted from 1), renormalise the rows.

    W, G, exp_avg, exp_avg_sq: [n, d] CPU float32 contiguous (G is read only). One native pass
    (~20 flops per element); it also leaves W packed for the fused decoder's next call.
    """
    ext = native.load()
    beta1, beta2 = betas
    n = W.shape[0]
    panels = W.new_empty(0)
    if kernels.decoder_uses_panels(n):
        entry = _PANELS.get(W)
        shape = (-(-W.shape[1] // 16), n, 16)
        panels = (
            entry.panels
            if entry is not None and entry.panels.shape == shape
            else W.new_empty(shape)
        )
    bias1, bias2 = 1 - beta1**step, 1 - beta2**step
    ext.adam_unit_rows(W, G, exp_avg, exp_avg_sq, panels, lr / bias1, beta1, beta2, eps, bias2**0.5)
    torch.autograd.graph.increment_version(W)  # written through its data pointer
    if panels.numel():
        _PANELS[W] = _Panels(W._version, W.data_ptr(), W.untyped_storage(), panels)
    else:
        _PANELS.pop(W, None)
