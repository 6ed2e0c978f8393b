"""What evaluation needs from the model alone, computed once per eval set and hook.

The part of the model below the hook runs here, once per batch of eval contexts; its output is
stored, and every SAE evaluated on the same eval set (a sweep, a re-run with another SAE
config) starts from it and runs only the part above the hook. The SAE-independent ablation
baselines are measured here too:
- zero ablation: the hook's activation replaced by zeros;
- mean ablation: replaced by its mean over the eval positions (the same for every token).
Positions < first_position keep their clean activation in every variant.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor
from tqdm.auto import tqdm

from sae_core.evaluation.metrics import next_token_ce
from sae_core.evaluation.splice import SplitModel

FILE = "captured.safetensors"


class Baseline(NamedTuple):
    """The part below the hook on every eval context, and the ablation baselines."""

    act: Tensor  # [C, T, d] the hook's activation
    block_input: Tensor | None  # [C, T, d] the hook block's input (attn_out / mlp_out hooks)
    mean: Tensor  # [d] mean activation over positions >= first_position
    ce_sums: dict[str, float]  # summed next-token CE per ablation ("zero", "mean")
    terms: int  # predictions those sums are over


def with_tail(act: Tensor, first: int, tail: Tensor) -> Tensor:
    """act [B, T, d] with positions >= first replaced by tail [B, T - first, d] (or broadcastable)."""
    out = act.clone()
    out[:, first:] = tail
    return out


def compute_baseline(
    split: SplitModel,
    contexts: Tensor,
    batch_contexts: int,
    first_position: int,
    progress: bool = True,
) -> Baseline:
    """contexts: [C, T] token ids. Cost: the part below the hook once, the part above twice."""
    device = next(split.model.parameters()).device
    batches = range(0, contexts.shape[0], batch_contexts)
    acts, inputs = [], []
    with torch.inference_mode():
        for start in tqdm(batches, desc="baseline: below hook", unit="batch", disable=not progress):
            captured = split.capture(contexts[start : start + batch_contexts].to(device))
            acts.append(captured.act)
            inputs.append(captured.block_input)
        act = torch.cat(acts)
        block_input = torch.cat(inputs) if split.needs_block_input else None
        mean = act[:, first_position:].double().mean(dim=(0, 1)).to(act.dtype)
        ce_sums = {"zero": 0.0, "mean": 0.0}
        terms = 0
        for start in tqdm(batches, desc="baseline: ablations", unit="batch", disable=not progress):
            ids = contexts[start : start + batch_contexts].to(device)
            part = act[start : start + batch_contexts]
            feed = None if block_input is None else block_input[start : start + batch_contexts]
            terms += ids.shape[0] * (ids.shape[1] - 1 - first_position)
            for name, tail in (("zero", torch.zeros_like(mean)), ("mean", mean)):
                logits = split.logits(ids, with_tail(part, first_position, tail), feed)
                ce_sums[name] += float(next_token_ce(logits, ids, first_position))
    kept_input = None if block_input is None else block_input.cpu()
    return Baseline(act.cpu(), kept_input, mean.cpu(), ce_sums, terms)


def baseline_bytes(baseline: Baseline) -> bytes:
    """The tensors as one safetensors byte string; the sums go in the manifest."""
    tensors = {"act": baseline.act, "mean": baseline.mean}
    if baseline.block_input is not None:
        tensors["block_input"] = baseline.block_input
    return save_tensors({k: v.contiguous() for k, v in tensors.items()})


def baseline_from(data: bytes, ce_sums: dict[str, float], terms: int) -> Baseline:
    """The inverse of `baseline_bytes`, with the sums the baseline dataset's manifest holds."""
    tensors = load_tensors(data)
    return Baseline(
        act=tensors["act"],
        block_input=tensors.get("block_input"),
        mean=tensors["mean"],
        ce_sums=ce_sums,
        terms=terms,
    )
