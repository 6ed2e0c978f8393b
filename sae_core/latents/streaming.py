"""Per-latent statistics over a stream of contexts, with state whose size does not depend on
the stream's length: top-k contexts, a reservoir sample of firing contexts (each with a token
window around its peak) and an activation histogram.

The stream arrives as `ContextChunk`s: whole contexts with their latent activations as a dense
[C, T, n] tensor. A context enters the per-latent statistics once, at its peak (its largest
activation of that latent), as in the usual "top activating contexts" views.

Shapes: n latents, C contexts in a chunk, T context length, S slots per latent (K top entries or
R reservoir entries), W = before + 1 + after window tokens, B histogram bins.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class ContextChunk(NamedTuple):
    """Whole contexts of the stream, their token ids and their dense latent activations."""

    context_ids: Tensor  # [C] int64, the tokens dataset's context_id
    tokens: Tensor  # [C, T] int64, -1 where a position has no activation row
    acts: Tensor  # [C, T, n] float32, 0 where a latent does not fire

    def peaks(self) -> tuple[Tensor, Tensor]:
        """Each context's largest activation of each latent and where: ([C, n], [C, n] int64).
        Cost O(C T n)."""
        return self.acts.max(dim=1)

    def windows(
        self, c: Tensor, p: Tensor, j: Tensor, before: int, after: int
    ) -> tuple[Tensor, Tensor]:
        """The window of latent j[e] around position p[e] of context c[e], all [E]:
        (tokens [E, W] int64, -1 off the context; acts [E, W], 0 off the context). Cost O(E W)."""
        pos = p[:, None] + torch.arange(-before, after + 1)  # [E, W]
        inside = (pos >= 0) & (pos < self.tokens.shape[1])
        pos = pos.clamp(0, self.tokens.shape[1] - 1)
        rows = c[:, None].expand_as(pos)
        tokens = self.tokens[rows, pos].masked_fill(~inside, -1)
        acts = self.acts[rows, pos, j[:, None].expand_as(pos)].masked_fill(~inside, 0.0)
        return tokens, acts


class Slots:
    """S remembered contexts per latent: which context, its peak and the window around it.
    context, position [n, S] int64 (context -1: empty); value [n, S]; tokens [n, S, W] int32
    (-1: off the context); acts [n, S, W]. Memory O(n S W)."""

    def __init__(self, n: int, slots: int, before: int, after: int):
        self.before, self.after = before, after
        width = before + 1 + after
        self.context = torch.full((n, slots), -1, dtype=torch.int64)  # -1: empty
        self.position = torch.zeros(n, slots, dtype=torch.int64)
        self.value = torch.zeros(n, slots)
        self.tokens = torch.full((n, slots, width), -1, dtype=torch.int32)
        self.acts = torch.zeros(n, slots, width)

    def tensors(self) -> list[Tensor]:
        return [self.context, self.position, self.value, self.tokens, self.acts]

    def permute(self, order: Tensor) -> None:
        """Reorder each latent's slots: slot s takes old slot order[:, s]. order: [n, S]."""
        for name in ("context", "position", "value"):
            setattr(self, name, getattr(self, name).gather(1, order))
        wide = order[..., None].expand(-1, -1, self.tokens.shape[2])
        self.tokens, self.acts = self.tokens.gather(1, wide), self.acts.gather(1, wide)

    def clear(self, empty: Tensor) -> None:
        """Empty the slots where `empty` [n, S] is True."""
        self.context[empty], self.position[empty], self.value[empty] = -1, 0, 0.0
        self.tokens[empty], self.acts[empty] = -1, 0.0

    def fill(self, j: Tensor, s: Tensor, chunk: ContextChunk, c: Tensor, p: Tensor) -> None:
        """Slot s[e] of latent j[e] := context c[e] of the chunk, peak at position p[e]. All [E]."""
        self.context[j, s] = chunk.context_ids[c]
        self.position[j, s] = p
        self.value[j, s] = chunk.acts[c, p, j]
        tokens, self.acts[j, s] = chunk.windows(c, p, j, self.before, self.after)
        self.tokens[j, s] = tokens.int()


class TopContexts:
    """Each latent's K highest-peaking contexts so far, descending: a streaming top-k heap per
    latent, merged a chunk at a time (top-k of the K kept and the chunk's C peaks).

    Equal peaks are ordered arbitrarily. Cost per chunk O(n (K + C) + n K W): the merge, and
    reordering the kept windows.
    """

    def __init__(self, n: int, k: int, before: int, after: int):
        self.slots = Slots(n, k, before, after)
        self.k = k

    def update(self, chunk: ContextChunk, peak: Tensor, where: Tensor) -> None:
        """peak, where: [C, n] from `chunk.peaks()`."""
        value, source = torch.cat([self.slots.value, peak.T], dim=1).topk(self.k, dim=1)
        fresh = source >= self.k  # [n, K]: taken from the chunk
        self.slots.permute(source.clamp(max=self.k - 1))
        self.slots.clear(fresh | (value <= 0))
        j, s = (fresh & (value > 0)).nonzero(as_tuple=True)
        c = source[j, s] - self.k
        self.slots.fill(j, s, chunk, c, where[c, j])


class Reservoir:
    """A uniform sample of R firing contexts per latent (Algorithm R, vectorised per chunk).

    The t-th firing context of a latent (t from 0) takes slot t while t < R, else a uniformly
    drawn slot with probability R / (t + 1); when several of a chunk's contexts draw the same
    slot, the latest one stays, as if they had arrived one by one. Cost per chunk O(E log E)
    for the chunk's E firing (context, latent) pairs.
    """

    def __init__(self, n: int, r: int, before: int, after: int, generator: torch.Generator):
        self.slots = Slots(n, r, before, after)
        self.r, self.generator = r, generator
        self.seen = torch.zeros(n, dtype=torch.int64)  # firing contexts so far, per latent

    def update(self, chunk: ContextChunk, peak: Tensor, where: Tensor) -> None:
        """peak, where: [C, n] from `chunk.peaks()`."""
        j, c = (peak.T > 0).nonzero(as_tuple=True)  # sorted by latent, then context order
        first = torch.searchsorted(j, j, side="left")  # where each latent's run starts
        t = self.seen[j] + torch.arange(len(j)) - first
        self.seen += torch.bincount(j, minlength=len(self.seen))
        draw = (torch.rand(len(j), generator=self.generator, dtype=torch.float64) * (t + 1)).long()
        keep = torch.where(t < self.r, t, draw) < self.r
        j, c, t = j[keep], c[keep], t[keep]
        if not len(j):
            return
        slot = torch.where(t < self.r, t, draw[keep])
        # Last writer wins: of the pairs aiming at one (latent, slot), keep the latest t.
        key = j * self.r + slot
        order = torch.argsort(key * (int(t.max()) + 1) + t)
        key, j, c, slot = key[order], j[order], c[order], slot[order]
        last = torch.ones_like(key, dtype=torch.bool)
        last[:-1] = key[1:] != key[:-1]
        self.slots.fill(j[last], slot[last], chunk, c[last], where[c[last], j[last]])


class DoublingHistogram:
    """Per latent, B equal bins over [0, hi), hi a power of two that doubles when a value
    reaches it (pairs of bins merge, so counts stay exact): an exact histogram of every
    activation seen, in O(n B) memory, without knowing the range in advance.

    Values must be > 0 (firing activations). Bin of v: floor(v B / hi), exact in floating point
    because B / hi is a power of two. Cost per update O(E) for E values, plus O(n B) when some
    latent's range grows.
    """

    def __init__(self, n: int, bins: int):
        if bins & (bins - 1):
            raise ValueError(f"histogram bins={bins}: must be a power of two")
        self.bins = bins
        self.hi = torch.zeros(n, dtype=torch.float64)  # 0: nothing seen yet
        self.counts = torch.zeros(n, bins, dtype=torch.int64)

    def update(self, latent: Tensor, value: Tensor) -> None:
        """latent: [E] int64; value: [E] > 0."""
        value = value.double()
        top = torch.zeros_like(self.hi).scatter_reduce(0, latent, value, "amax")
        # The smallest power of two above each maximum (frexp: top = m 2^e with m < 1).
        needed = torch.ldexp(torch.ones_like(top), torch.frexp(top).exponent)
        grow = (top > 0) & (needed > self.hi)
        fresh = grow & (self.hi == 0)
        self.hi[fresh] = needed[fresh]
        doublings = torch.log2(needed / self.hi).round().long() * (grow & ~fresh)
        for m in doublings.unique().tolist():
            if m > 0:
                self._merge(doublings == m, m)
        bin_ = (value * self.bins / self.hi[latent]).long().clamp_(max=self.bins - 1)
        self.counts.view(-1).index_add_(
            0, latent * self.bins + bin_, torch.ones_like(bin_, dtype=torch.int64)
        )

    def _merge(self, rows: Tensor, m: int) -> None:
        """Double the range of `rows` ([n] bool) m times: groups of 2^m bins become one."""
        group = min(2**m, self.bins)
        merged = self.counts[rows].view(-1, self.bins // group, group).sum(dim=2)
        self.counts[rows] = 0
        self.counts[rows, : self.bins // group] = merged
        self.hi[rows] *= 2.0**m

    def edges(self, j: int) -> list[float]:
        """Latent j's B + 1 bin edges (all 0 when it never fired)."""
        return torch.linspace(0.0, float(self.hi[j]), self.bins + 1).tolist()


def state_bytes(*tensors: Tensor) -> int:
    """Bytes held by the given state tensors (what a streaming statistic keeps)."""
    return sum(t.nelement() * t.element_size() for t in tensors)
