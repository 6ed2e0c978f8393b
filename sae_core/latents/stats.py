"""Latent statistics of an SAE on its eval activations, in one streaming pass.

The pass reads the eval split of the SAE's activations dataset once, in storage order, a chunk
of whole contexts at a time (`LatentsConfig.batch_tokens` rows), encodes each chunk and feeds:
firing counts, each latent's activation histogram, top contexts and a reservoir of firing
contexts (sae_core.latents.streaming), and the explanation counts (sae_core.latents.explain). The first half
of the contexts (by rows) is the explanation half: once it has passed, each latent's n-gram
explanation is chosen from its top contexts so far, and the second half scores it. Memory: the
per-latent state (O(n (K + R) W + n B) plus two fixed-size sketches) and one chunk's dense
[rows, n] codes, whatever the eval split's size.

The dataset the viewer reads is written from them by sae_core.latents.pages.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_core.config import LatentsConfig
from sae_core.latents.explain import ExplanationCounts, Explanations, HeldOutScore, chunk_ngrams
from sae_core.latents.logit_lens import LogitLens, Unembedding, logit_lens
from sae_core.latents.streaming import (
    ContextChunk,
    DoublingHistogram,
    Reservoir,
    Slots,
    TopContexts,
)
from sae_core.sae import SparseAutoencoder
from sae_core.storage.layout import activation_matrix
from sae_core.storage.loader import read_split, split_manifest
from sae_core.storage.refs import DatasetRef


class LatentStatistics(NamedTuple):
    """Everything the pass found, per latent (n of them)."""

    tokens: int  # eval tokens seen
    explain_tokens: int  # of which the explanation half
    fires: Tensor  # [n] tokens where the latent fired
    top: Slots  # K top contexts, descending
    random: Slots  # R uniformly sampled firing contexts
    histogram: DoublingHistogram
    explanations: Explanations
    precision: Tensor  # [n] held-out precision of the explanation
    recall: Tensor  # [n] held-out recall
    scored: Tensor  # [n] bool: has an explanation and fires on held-out tokens
    lens: LogitLens


class _Rows(NamedTuple):
    """Consecutive activation rows of whole contexts."""

    x: np.ndarray  # [R, d]
    sequence: np.ndarray  # [R] context ids
    position: np.ndarray  # [R]
    token: np.ndarray  # [R]


def _cut(sequence: np.ndarray, size: int, cut: int, final: bool) -> int | None:
    """Where the next chunk ends: the last context start within `size` rows (else the first
    after it), moved back to the first context start at or after `cut` when it lies inside;
    None while no whole context is buffered."""
    starts = np.flatnonzero(sequence[1:] != sequence[:-1]) + 1
    if final:
        starts = np.append(starts, len(sequence))
    if not len(starts):
        return None
    within = starts[starts <= size]
    end = int(within[-1]) if len(within) else int(starts[0])
    if 0 < cut < end:
        end = int(starts[starts >= cut][0])
    return end


def _context_chunks(ref: DatasetRef, size: int, cut: int) -> Iterator[tuple[_Rows, bool]]:
    """The eval split's rows as chunks of whole contexts of about `size` rows, with whether a
    chunk lies after row `cut` (no chunk straddles the first context start at or after it)."""
    pending: list[_Rows] = []
    offset = 0  # split row of pending's first row
    for batch in read_split(ref, "eval"):
        pending.append(
            _Rows(
                activation_matrix(batch),
                batch.column("sequence").to_numpy(),
                batch.column("position").to_numpy().astype(np.int64),
                batch.column("token_id").to_numpy().astype(np.int64),
            )
        )
        buffered = _Rows(*(np.concatenate(parts) for parts in zip(*pending, strict=True)))
        while len(buffered.sequence) > size:
            end = _cut(buffered.sequence, size, cut - offset, final=False)
            if end is None:
                break
            yield _Rows(*(a[:end] for a in buffered)), offset >= cut
            buffered, offset = _Rows(*(a[end:] for a in buffered)), offset + end
        pending = [buffered]
    rest = pending[0] if pending else None
    while rest is not None and len(rest.sequence):
        end = _cut(rest.sequence, size, cut - offset, final=True)
        yield _Rows(*(a[:end] for a in rest)), offset >= cut
        rest, offset = _Rows(*(a[end:] for a in rest)), offset + end


def _densify(
    rows: _Rows, idx: Tensor, vals: Tensor, context_len: int, n: int
) -> tuple[ContextChunk, Tensor, Tensor]:
    """Rows and their codes (idx, vals [R, k]) -> (the chunk with dense acts [C, T, n], each
    row's context slot [R], each row's position [R]). Cost O(C T n) memory and time."""
    new = np.r_[True, rows.sequence[1:] != rows.sequence[:-1]]
    row_c = torch.from_numpy(np.cumsum(new) - 1)
    row_p = torch.from_numpy(rows.position)
    C = int(row_c[-1]) + 1
    tokens = torch.full((C, context_len), -1, dtype=torch.int64)
    tokens[row_c, row_p] = torch.from_numpy(rows.token)
    acts = torch.zeros(C * context_len, n)
    acts[(row_c * context_len + row_p)[:, None], idx] = vals.float()
    chunk = ContextChunk(torch.from_numpy(rows.sequence[new]), tokens, acts.view(C, context_len, n))
    return chunk, row_c, row_p


@torch.inference_mode()
def latent_statistics(
    sae: SparseAutoencoder,
    acts: DatasetRef,
    unembed: Unembedding,
    cfg: LatentsConfig,
    progress: bool = True,
) -> LatentStatistics:
    """One pass over `acts`' eval split (see the module docstring), then the logit lens.

    Cost: the SAE's encoder on every eval token, O(C T n) per chunk for the dense codes and
    peaks, the explanation counts' hashing (O(max_ngram k) per token), and the logit lens
    (2 n d V flops)."""
    manifest, info = split_manifest(acts, "eval")
    context_len, rows = manifest.recorded("context_len").context_len, info.rows
    n, before = sae.n_latents, cfg.window_before
    sae = sae.cpu().eval()
    top = TopContexts(n, cfg.top_contexts, before, cfg.window_after)
    sample = Reservoir(
        n, cfg.random_contexts, before, cfg.window_after, torch.Generator().manual_seed(cfg.seed)
    )
    histogram = DoublingHistogram(n, cfg.histogram_bins)
    counts = ExplanationCounts(n, cfg.max_ngram, cfg.sketch_width)
    fires = torch.zeros(n, dtype=torch.int64)
    explanations: Explanations | None = None
    # Until the explanation half has passed (for good, with a single context) nothing is scored.
    score = HeldOutScore(Explanations(torch.full((n,), -1), torch.zeros(n), torch.zeros(n)))
    explain_tokens = 0
    bar = tqdm(total=rows, desc="latent statistics", unit="tok", disable=not progress)
    for chunk_rows, held_out in _context_chunks(acts, cfg.batch_tokens, rows // 2):
        if held_out and explanations is None:  # the explanation half is done: choose from it
            explanations = counts.choose(top.slots.tokens, before, top.slots.context >= 0)
            score = HeldOutScore(explanations)
        codes = sae.encode(torch.from_numpy(chunk_rows.x).float())
        chunk, row_c, row_p = _densify(chunk_rows, codes.idx, codes.vals, context_len, n)
        peak, where = chunk.peaks()
        top.update(chunk, peak, where)
        sample.update(chunk, peak, where)
        fired = codes.vals > 0
        histogram.update(codes.idx[fired], codes.vals[fired])
        fires += torch.bincount(codes.idx[fired], minlength=n)
        grams = chunk_ngrams(chunk.tokens, cfg.max_ngram)
        if held_out:
            score.update(grams, row_c, row_p, codes.idx, codes.vals)
        else:
            counts.update(grams, row_c, row_p, codes.idx, codes.vals)
            explain_tokens += len(row_c)
        bar.update(len(row_c))
    bar.close()
    if explanations is None:  # a single context: nothing held out, nothing scored
        explanations = counts.choose(top.slots.tokens, before, top.slots.context >= 0)
    precision, recall, scored = score.result()
    return LatentStatistics(
        tokens=rows,
        explain_tokens=explain_tokens,
        fires=fires,
        top=top.slots,
        random=sample.slots,
        histogram=histogram,
        explanations=explanations,
        precision=precision,
        recall=recall,
        scored=scored,
        lens=logit_lens(sae.dense_decoder(), unembed, cfg.logit_tokens, progress=progress),
    )
