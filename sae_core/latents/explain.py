"""Token-pattern explanations of latents and their precision and recall, after Neuron-to-Graph
(Foote et al. 2023), the explainability measure of Gao et al. 2024.

A latent's explanation is one n-gram (n <= 3) ending at the token where it fires: the candidate,
among the n-grams ending at the peaks of its top contexts, that best predicts firing on the
explanation half of the eval tokens (highest F1 of "the n-gram ends here" against "the latent
fires here", among those seen firing at least twice when there are any). The counts behind
that choice come from two count-min sketches filled while the explanation half streams by (the
candidates are known only once it has passed): occurrences of every n-gram, and firings of
every (latent, n-gram ending at the firing token). Count-min overestimates by at most e/width of
the events added, with probability 1 - e^-depth.
Explanations are then scored exactly on the held-out half: precision = firing tokens where the
n-gram ends / tokens where it ends, recall = those / firing tokens.

Unlike N2G, candidates are not pruned with model re-runs and carry no wildcards: one exact n-gram
per latent. A latent "fires" on a token when its activation is > 0 (as in the evaluation's
density). N-grams lie within one context, over positions that have activations.

Shapes: n latents, C contexts, T positions, R activation rows, k codes per row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from sae_core.errors import ConfigError

TOKEN_BITS = 20  # an n-gram packs into an int64: 3 x 20 bits of token ids + its length
MAX_N = 3
_MASK = (1 << TOKEN_BITS) - 1
_SEEDS = np.array(
    [0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93,
     0xA0761D6478BD642F, 0xE7037ED1A0B428DB, 0x8EBC6AF09C88C6E3, 0x589965CC75374CC3],
    dtype=np.uint64,
)  # fmt: skip


def pack_ngrams(tokens: Tensor, n: int) -> Tensor:
    """The n-gram ending at each position, packed: tokens [..., T] integer (-1: none) ->
    [..., T] int64, -1 where the n-gram leaves the sequence or misses a token. Cost O(n T)."""
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n-gram length {n}: must be 1..{MAX_N}")
    tokens = tokens.long()
    if tokens.numel() and int(tokens.max()) > _MASK:
        raise ConfigError(
            f"latent explanations pack token ids in {TOKEN_BITS} bits; this vocabulary is larger"
        )
    code = torch.full_like(tokens, n << (MAX_N * TOKEN_BITS))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    for i in range(n):  # token t - i goes to bits [20 i, 20 i + 20)
        shifted = torch.full_like(tokens, -1)
        shifted[..., i:] = tokens[..., : tokens.shape[-1] - i]
        valid &= shifted >= 0
        code |= shifted.clamp(min=0) << (TOKEN_BITS * i)
    return code.masked_fill(~valid, -1)


def unpack_ngram(code: int) -> list[int]:
    """A packed n-gram's token ids, first to last."""
    n = code >> (MAX_N * TOKEN_BITS)
    return [(code >> (TOKEN_BITS * i)) & _MASK for i in reversed(range(n))]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective scramble of uint64 keys (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def latent_key(latent: Tensor, ngram: Tensor) -> np.ndarray:
    """One uint64 key per (latent, packed n-gram) pair, both [E]."""
    j = latent.numpy().astype(np.uint64) * _SEEDS[0]
    return _mix(ngram.numpy().astype(np.uint64) ^ j)


class CountMinSketch:
    """Approximate counts of uint64 keys in depth x width int64 cells: `query` never
    undercounts and overcounts by at most e N / width (N keys added) with probability
    1 - e^-depth. Cost O(depth E) per call of E keys, plus O(depth width) per `add`."""

    def __init__(self, width: int, depth: int = 4):
        self.width, self.depth = width, depth
        self.table = np.zeros((depth, width), dtype=np.int64)

    def _cells(self, keys: np.ndarray) -> list[np.ndarray]:
        return [(_mix(keys ^ _SEEDS[i + 1]) % np.uint64(self.width)).astype(np.int64)
                for i in range(self.depth)]  # fmt: skip

    def add(self, keys: np.ndarray) -> None:
        for row, cells in zip(self.table, self._cells(keys), strict=True):
            row += np.bincount(cells, minlength=self.width)

    def query(self, keys: np.ndarray) -> np.ndarray:
        cells = self._cells(keys)
        return np.min([row[c] for row, c in zip(self.table, cells, strict=True)], axis=0)


class Explanations(NamedTuple):
    """One n-gram per latent, as chosen on the explanation half."""

    code: Tensor  # [n] int64 packed n-gram, -1: no explanation (no firing top context)
    precision: Tensor  # [n] estimated on the explanation half (sketch counts)
    recall: Tensor  # [n]


def chunk_ngrams(tokens: Tensor, max_n: int) -> Tensor:
    """Packed n-grams of every length ending at each position: [C, T] -> [max_n, C, T]."""
    return torch.stack([pack_ngrams(tokens, n) for n in range(1, max_n + 1)])


class ExplanationCounts:
    """The explanation half's counts, sketched: n-gram occurrences and latent firings per
    n-gram ending at the firing token, plus each latent's exact firing count."""

    def __init__(self, n_latents: int, max_n: int, width: int):
        self.max_n = max_n
        self.ngrams = CountMinSketch(width)
        self.firings = CountMinSketch(width)
        self.fires = torch.zeros(n_latents, dtype=torch.int64)

    def update(
        self, grams: Tensor, row_c: Tensor, row_p: Tensor, idx: Tensor, vals: Tensor
    ) -> None:
        """grams: [max_n, C, T] from `chunk_ngrams`; rows at (row_c, row_p), both [R]; their
        codes idx, vals: [R, k]. Cost O(max_n R k) hashing."""
        at_rows = grams[:, row_c, row_p]  # [max_n, R]
        self.ngrams.add(at_rows[at_rows >= 0].numpy().astype(np.uint64))
        fired = vals > 0
        latent = idx[fired]  # [F]
        self.fires += torch.bincount(latent, minlength=len(self.fires))
        row = fired.nonzero(as_tuple=True)[0]
        gram = at_rows[:, row]  # [max_n, F]
        ok = gram >= 0
        self.firings.add(latent_key(latent.expand_as(gram)[ok], gram[ok]))

    def choose(
        self, peak_tokens: Tensor, peak_index: int, filled: Tensor, min_support: int = 2
    ) -> Explanations:
        """The best-F1 candidate per latent. peak_tokens: [n, K, W] windows of the top contexts
        with the peak at `peak_index`; filled: [n, K] which windows are real. Candidates seen
        firing fewer than `min_support` times lose to any that were; ties go to the shorter
        n-gram. Cost O(n K max_n) sketch queries."""
        n, K, _ = peak_tokens.shape
        grams = torch.stack(
            [pack_ngrams(peak_tokens, m)[..., peak_index] for m in range(1, self.max_n + 1)], 1
        ).reshape(n, self.max_n * K)  # [n, max_n K], shorter n-grams first
        ok = grams >= 0
        ok &= filled.repeat(1, self.max_n)
        latent = torch.arange(n)[:, None].expand_as(grams)
        fired = torch.zeros(grams.shape, dtype=torch.float64)
        seen = torch.zeros(grams.shape, dtype=torch.float64)
        if ok.any():
            fired[ok] = torch.from_numpy(
                self.firings.query(latent_key(latent[ok], grams[ok])).astype(np.float64)
            )
            seen[ok] = torch.from_numpy(
                self.ngrams.query(grams[ok].numpy().astype(np.uint64)).astype(np.float64)
            )
        precision = (fired / seen.clamp(min=1)).clamp(max=1)
        recall = (fired / self.fires[:, None].clamp(min=1)).clamp(max=1)
        f1 = f1_score(precision, recall).masked_fill(~ok, -1)
        # A pattern seen firing once may be a coincidence: prefer those with support, if any.
        supported = ok & (fired >= min_support)
        f1 = torch.where(supported.any(dim=1, keepdim=True) & ~supported, f1 - 2, f1)
        best = f1.argmax(dim=1, keepdim=True)  # the first maximum: the shortest n-gram
        has = ok.any(dim=1)
        code = grams.gather(1, best).squeeze(1).masked_fill(~has, -1)
        return Explanations(
            code,
            precision.gather(1, best).squeeze(1).masked_fill(~has, 0.0),
            recall.gather(1, best).squeeze(1).masked_fill(~has, 0.0),
        )


class HeldOutScore:
    """Exact counts, on held-out tokens, of each latent's explanation against its firing."""

    def __init__(self, explanations: Explanations):
        code = explanations.code
        self.code = code
        self.length = torch.where(code >= 0, code >> (MAX_N * TOKEN_BITS), 0)  # [n], 0: none
        n = len(code)
        self.matches = torch.zeros(n, dtype=torch.int64)  # tokens where the n-gram ends
        self.fires = torch.zeros(n, dtype=torch.int64)  # tokens where the latent fires
        self.hits = torch.zeros(n, dtype=torch.int64)  # both

    def update(
        self, grams: Tensor, row_c: Tensor, row_p: Tensor, idx: Tensor, vals: Tensor
    ) -> None:
        """As `ExplanationCounts.update`. Cost O(max_n R log R + n log R + R k)."""
        at_rows = grams[:, row_c, row_p]  # [max_n, R]
        for m in self.length.unique().tolist():
            if m == 0:
                continue
            values, counts = at_rows[m - 1][at_rows[m - 1] >= 0].unique(return_counts=True)
            mine = (self.length == m).nonzero(as_tuple=True)[0]
            if not len(values):
                continue
            slot = torch.searchsorted(values, self.code[mine]).clamp(max=len(values) - 1)
            found = values[slot] == self.code[mine]
            self.matches[mine[found]] += counts[slot[found]]
        fired = vals > 0
        latent = idx[fired]
        self.fires += torch.bincount(latent, minlength=len(self.fires))
        row = fired.nonzero(as_tuple=True)[0]
        length = self.length[latent]
        scored = length > 0
        gram = at_rows[(length - 1).clamp(min=0), row]
        hit = scored & (gram == self.code[latent])
        self.hits += torch.bincount(latent[hit], minlength=len(self.hits))

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(precision [n], recall [n], scored [n] bool): scored latents have an explanation and
        fire on held-out tokens; precision is 0 when the n-gram never occurs there."""
        precision = self.hits.double() / self.matches.clamp(min=1)
        recall = self.hits.double() / self.fires.clamp(min=1)
        return precision, recall, (self.length > 0) & (self.fires > 0)


def f1_score(precision: Tensor, recall: Tensor) -> Tensor:
    return 2 * precision * recall / (precision + recall).clamp(min=1e-12)


_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def explainability_summary(precision: Tensor, recall: Tensor, scored: Tensor) -> dict:
    """Mean, quantiles and a 10-bin histogram over [0, 1] of precision, recall and F1 among
    the scored latents (all NaN means when none is scored)."""
    out: dict = {
        "scored_latents": int(scored.sum()),
        "scored_fraction": float(scored.double().mean()),
    }
    for name, values in (("precision", precision), ("recall", recall),
                         ("f1", f1_score(precision, recall))):  # fmt: skip
        v = values[scored].double()
        empty = v.numel() == 0
        out[name] = {
            "mean": float("nan") if empty else float(v.mean()),
            "quantiles": {
                str(q): float("nan") if empty else float(v.quantile(q)) for q in _QUANTILES
            },
            "histogram": torch.histc(v, bins=10, min=0.0, max=1.0).long().tolist(),
        }
    return out
