"""The forward to a resid_post hook through torch.compile (`model.compile`).

Extraction spends its time in the blocks below the hook. Eager PyTorch runs each of their norms,
rotary embeddings and activations as separate passes over memory, and in bfloat16 on a CPU
those passes, not the GEMMs, set the pace. Inductor fuses them and, with the weights frozen as
constants, pre-packs the GEMMs' weights (measured in docs/results/research/: about 1.2x in
bfloat16 on the development CPU, after 20-40 s of compiling).

The compiled module is a trunk of the model: its embeddings and its blocks up to the hook, the
final norm left out, so its output is the residual stream leaving the hook's block. It shares
the model's weights. Every batch is padded to one shape, so the trunk compiles once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from sae_core.data.models import HookPoint, check_hook, layers_holder
from sae_core.errors import ConfigError

# Where each architecture keeps the norm after its last block, on the module holding the blocks.
_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")


def _trunk(model: nn.Module, layers: int) -> nn.Module:
    """The module holding the blocks, with only its first `layers` blocks and no final norm;
    a shallow copy sharing the model's weights (the model itself is left whole)."""
    holder, attr, blocks = layers_holder(model)
    norm = next(
        (name for name in _FINAL_NORMS if isinstance(getattr(holder, name, None), nn.Module)), None
    )
    if norm is None:
        raise ConfigError(
            f"model.compile: cannot find the final norm of {type(model).__name__} "
            f"(looked for {', '.join(_FINAL_NORMS)}); set model.compile=false"
        )
    trunk = object.__new__(type(holder))
    trunk.__dict__ = dict(holder.__dict__)
    trunk._modules = dict(holder._modules)
    trunk._modules[attr] = nn.ModuleList(list(blocks)[:layers])
    trunk._modules[norm] = nn.Identity()
    return trunk


class CompiledForward:
    """`run_to_hooks(model, input_ids, [hook])` for one resid_post hook, compiled.

    Call with input_ids [B, T], B <= `batch_rows`: returns [activation [B, T, d]] in the model's
    dtype. Cost: the blocks up to the hook on `batch_rows` contexts whatever B is (short batches
    are padded), plus one compilation at the first call. Run it under `torch.inference_mode()`:
    frozen weights are constants only without autograd.
    """

    def __init__(self, model: nn.Module, hooks: Sequence[str], batch_rows: int):
        points = [check_hook(model.config, h) for h in hooks]
        if len(set(points)) != 1 or points[0].kind != "resid_post":
            raise ConfigError(
                f"model.compile: compiles the forward to one resid_post hook, not "
                f"{', '.join(map(str, points))}; set model.compile=false"
            )
        self.hook: HookPoint = points[0]
        self.batch_rows = batch_rows
        trunk = _trunk(model, self.hook.layer + 1)
        self._forward = torch.compile(trunk, dynamic=False, options={"freezing": True})

    def __call__(self, input_ids: Tensor) -> list[Tensor]:
        rows = input_ids.shape[0]
        if rows > self.batch_rows:
            raise ValueError(f"CompiledForward: {rows} contexts, more than {self.batch_rows}")
        padded = input_ids
        if rows < self.batch_rows:
            filler = input_ids[:1].expand(self.batch_rows - rows, -1)
            padded = torch.cat([input_ids, filler])
        hidden = self._forward(input_ids=padded, use_cache=False).last_hidden_state
        return [hidden[:rows]]
