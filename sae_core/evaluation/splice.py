"""A causal LM cut at a hook: the part below runs once per batch, the part above once per variant.

Evaluation compares many variants of the hook's activation (clean, SAE reconstruction, zero,
mean, single-latent ablations). They differ only above the hook, so `SplitModel.capture` runs
the blocks below it once and keeps their output, and `SplitModel.logits` runs the model with
those blocks swapped for pass-through modules and the hook's activation set to the variant.
The embeddings still run (cheap, and they keep the model's own forward, masks and position
embeddings intact); their output is ignored by the pass-through blocks.

What the part above needs, per hook kind (block L holds the hook):
- resid_pre.L: the activation itself, fed to block L; blocks 0..L-1 pass through.
- resid_post.L: the activation itself, as block L's output; blocks 0..L pass through.
- attn_out.L / mlp_out.L / mlp_in.L: block L's input (the clean resid_pre.L, captured too)
  and the activation as the sublayer's output (mlp_in: the MLP's input); blocks 0..L-1 pass
  through and block L runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae_core.data.models import HookPoint, check_hook, decoder_layers, hooked, run_to_hooks


class Captured(NamedTuple):
    """The part below the hook, for a batch of contexts [B, T]."""

    act: Tensor  # [B, T, d] the hook's activation
    block_input: Tensor | None  # [B, T, d] resid_pre of the hook's block (sublayer hooks only)


class _PassThrough(nn.Module):
    """Stands in for a decoder block whose output is never used: returns its input unchanged."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: Tensor, *args: object, **kwargs: object) -> object:
        return (hidden_states,) if self.returns_tuple else hidden_states


class _BlockSeen(Exception):
    """Stops the probe forward once the first block has returned."""


class SplitModel:
    """`model` cut at `hook`. Grad mode is the caller's (use `torch.inference_mode()`)."""

    def __init__(self, model: nn.Module, hook: str | HookPoint):
        self.model = model
        self.point = check_hook(model.config, hook)
        self.needs_block_input = self.point.kind in ("attn_out", "mlp_in", "mlp_out")
        # Blocks whose output the part above never reads.
        self.bypassed = self.point.layer + (self.point.kind == "resid_post")
        self._returns_tuple: bool | None = None

    def capture(self, input_ids: Tensor) -> Captured:
        """Run the blocks up to the hook once. input_ids: [B, T] -> Captured ([B, T, d] each)."""
        if not self.needs_block_input:
            return Captured(run_to_hooks(self.model, input_ids, [self.point])[0], None)
        block_input, act = run_to_hooks(
            self.model, input_ids, [HookPoint("resid_pre", self.point.layer), self.point]
        )
        return Captured(act, block_input)

    def logits(
        self,
        input_ids: Tensor,
        act: Tensor,
        block_input: Tensor | None = None,
        keep: int = 0,
    ) -> Tensor:
        """Logits with the hook's activation set to `act` [B, T, d]; only the part above runs.

        input_ids: [B, T]; block_input: [B, T, d] from `capture` (sublayer hooks only).
        keep > 0 computes the unembedding for the last `keep` positions only: [B, keep, V];
        otherwise [B, T, V].
        """
        if self.needs_block_input and block_input is None:
            raise ValueError(f"hook {self.point}: pass the captured block_input")
        with ExitStack() as stack:
            stack.enter_context(self._bypassing())
            if self.needs_block_input:
                feed = HookPoint("resid_pre", self.point.layer)
                stack.enter_context(hooked(self.model, feed, lambda _h: block_input))
            stack.enter_context(hooked(self.model, self.point, lambda _h: act))
            out = self.model(input_ids=input_ids, use_cache=False, logits_to_keep=keep)
        return out.logits

    @contextmanager
    def _bypassing(self) -> Iterator[None]:
        """Swap blocks 0..bypassed-1 for pass-through modules while the block runs."""
        layers = decoder_layers(self.model)
        if self.bypassed == 0:
            yield
            return
        stub = _PassThrough(self._block_returns_tuple())
        originals = [layers[i] for i in range(self.bypassed)]
        for i in range(self.bypassed):
            layers[i] = stub
        try:
            yield
        finally:
            for i, block in enumerate(originals):
                layers[i] = block

    def _block_returns_tuple(self) -> bool:
        """Whether a decoder block returns a tuple (older transformers) or a tensor; the
        stand-in must match, as the model's loop unpacks it. Found once by a 1-token forward."""
        if self._returns_tuple is None:
            seen: list[bool] = []

            def record(_mod: nn.Module, _args: tuple, output: object) -> None:
                seen.append(isinstance(output, tuple))
                raise _BlockSeen

            handle = decoder_layers(self.model)[0].register_forward_hook(record)
            device = next(self.model.parameters()).device
            try:
                with torch.no_grad():
                    self.model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
            except _BlockSeen:
                pass
            finally:
                handle.remove()
            self._returns_tuple = seen[0]
        return self._returns_tuple
