"""The dataset the latent viewer reads, written from a pass's `LatentStatistics`.

Layout (JSON, compact, no NaN):
- `summary.json`: the SAE, the eval split's sizes, the density histogram over latents, the
  explainability summary (means, quantiles, histograms of held-out precision, recall, F1), the
  layout below and the config;
- `index/chunk-NNNNN.json`: INDEX_CHUNK index rows each (id, density, max activation,
  explanation, held-out precision/recall/F1, most frequent peak token), in latent order;
- `latents/page-NNNNN.json`: the full records of PAGE_SIZE latents each: few files on the
  store, and the viewer serves one latent's record at a time.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_core.config import LatentsConfig
from sae_core.evaluation.metrics import density_histogram, latent_density
from sae_core.latents.explain import explainability_summary, f1_score, unpack_ngram
from sae_core.latents.stats import LatentStatistics
from sae_core.latents.streaming import Slots
from sae_core.storage.store import DatasetWriter

PAGE_SIZE = 64  # latent records per stored page
INDEX_CHUNK = 1024  # index rows per chunk the viewer fetches


def _rounded(t: Tensor, digits: int) -> list:
    """t to `digits` significant digits, as (nested) Python floats. Vectorised: per-element
    formatting would cost a microsecond per value, millions of them."""
    t = t.double()
    scale = 10.0 ** (digits - 1 - t.abs().clamp(min=1e-30).log10().floor())
    return ((t * scale).round() / scale).tolist()


def _clean(tree: Any) -> Any:
    """NaN -> None throughout a JSON-able tree (JSON has no NaN)."""
    if isinstance(tree, dict):
        return {k: _clean(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clean(v) for v in tree]
    return None if isinstance(tree, float) and tree != tree else tree


class _SlotLists(NamedTuple):
    """A `Slots` as nested lists: [n][S] contexts, positions, values; [n][S][W] tokens, acts."""

    context: list
    position: list
    value: list
    tokens: list
    acts: list

    @classmethod
    def of(cls, slots: Slots) -> _SlotLists:
        return cls(
            slots.context.tolist(),
            slots.position.tolist(),
            _rounded(slots.value, 4),
            slots.tokens.tolist(),
            _rounded(slots.acts, 3),
        )

    def windows(self, j: int, before: int, text: dict[int, str]) -> list[dict[str, Any]]:
        """Latent j's filled slots as {context, position, value, tokens, acts, peak}: the
        window's tokens and activations, without positions that have no activation row."""
        out = []
        for s, context in enumerate(self.context[j]):
            if context < 0:
                continue
            tokens, acts = self.tokens[j][s], self.acts[j][s]
            shown = [i for i, t in enumerate(tokens) if t >= 0] if -1 in tokens else None
            out.append({
                "context": context,
                "position": self.position[j][s],
                "value": self.value[j][s],
                "tokens": [text[t] for t in tokens] if shown is None else [text[tokens[i]] for i in shown],
                "acts": acts if shown is None else [acts[i] for i in shown],
                "peak": before - tokens[:before].count(-1),
            })  # fmt: skip
        return out


class _Records:
    """Builds each latent's record from the statistics, converted to lists once."""

    def __init__(self, stats: LatentStatistics, text: dict[int, str], before: int):
        self.text, self.before = text, before
        self.top, self.random = _SlotLists.of(stats.top), _SlotLists.of(stats.random)
        self.fires = stats.fires.tolist()
        self.density = _rounded(stats.fires.double() / max(stats.tokens, 1), 4)
        hist = stats.histogram
        self.counts, self.hi = hist.counts.tolist(), hist.hi.tolist()
        self.edges = _rounded(hist.hi[:, None] * torch.arange(hist.bins + 1) / hist.bins, 4)
        lens = stats.lens
        self.lens = {
            "promoted": (lens.promoted.tolist(), _rounded(lens.promoted_logits, 4)),
            "suppressed": (lens.suppressed.tolist(), _rounded(lens.suppressed_logits, 4)),
        }
        f1 = f1_score(stats.precision, stats.recall)
        self.scores = [
            _rounded(x, 4) for x in (stats.precision, stats.recall, f1,
                                      stats.explanations.precision, stats.explanations.recall)
        ]  # fmt: skip
        self.codes, self.scored = stats.explanations.code.tolist(), stats.scored.tolist()

    def quantile(self, j: int, value: float) -> float:
        """Share of latent j's firing activations below `value` (linear within a bin)."""
        counts = self.counts[j]
        width = self.hi[j] / len(counts)
        b = min(int(value / width), len(counts) - 1)
        below = sum(counts[:b]) + counts[b] * min(1.0, value / width - b)
        return round(below / max(sum(counts), 1), 3)

    def explanation(self, j: int) -> dict[str, Any] | None:
        if self.codes[j] < 0:
            return None
        precision, recall, f1, est_precision, est_recall = (x[j] for x in self.scores)
        scored = self.scored[j]
        return {
            "tokens": [self.text[t] for t in unpack_ngram(self.codes[j])],
            "precision": precision if scored else None,
            "recall": recall if scored else None,
            "f1": f1 if scored else None,
            "explain_precision": est_precision,
            "explain_recall": est_recall,
        }

    def __call__(self, j: int) -> dict[str, Any]:
        """Everything the viewer shows of latent j."""
        random = self.random.windows(j, self.before, self.text)
        for window in random:
            window["quantile"] = self.quantile(j, window["value"])
        random.sort(key=lambda w: -w["value"])
        return {
            "id": j,
            "fires": self.fires[j],
            "density": self.density[j],
            "max": self.top.value[j][0],
            "histogram": {"edges": self.edges[j], "counts": self.counts[j]},
            "explanation": self.explanation(j),
            "top": self.top.windows(j, self.before, self.text),
            "random": random,
            "logits": {
                side: [[self.text[t], v] for t, v in zip(ids[j], values[j], strict=True)]
                for side, (ids, values) in self.lens.items()
            },
        }


def index_row(record: dict[str, Any]) -> dict[str, Any]:
    """A latent's row in the searchable index: id, density, max activation, explanation tokens
    with their held-out precision, recall and F1, and the most frequent peak token among its
    top contexts."""
    peaks = Counter(w["tokens"][w["peak"]] for w in record["top"] if w["tokens"])
    expl = record["explanation"] or {}
    return {
        "id": record["id"],
        "density": record["density"],
        "max": record["max"],
        "expl": expl.get("tokens", []),
        "p": expl.get("precision"),
        "r": expl.get("recall"),
        "f1": expl.get("f1"),
        "top": peaks.most_common(1)[0][0] if peaks else "",
    }


def token_texts(
    stats: LatentStatistics, decode: Callable[[list[int]], list[str]]
) -> dict[int, str]:
    """The string of every token id the records show, each decoded on its own."""
    codes = stats.explanations.code
    grams = [t for c in codes[codes >= 0].tolist() for t in unpack_ngram(c)]
    ids = torch.cat([
        stats.top.tokens.reshape(-1).long(), stats.random.tokens.reshape(-1).long(),
        stats.lens.promoted.reshape(-1), stats.lens.suppressed.reshape(-1),
        torch.tensor(grams, dtype=torch.int64),
    ]).unique()  # fmt: skip
    ids = ids[ids >= 0].tolist()
    return dict(zip(ids, decode(ids), strict=True))


def explainability_metrics(explainability: dict[str, Any]) -> dict[str, float]:
    """The flat figures logged beside the evaluation's in MLflow: mean and 10/50/90th
    percentiles of held-out precision, recall and F1, and how many latents were scored.
    explainability: the summary's `explainability` entry (None stands for NaN)."""
    nan = float("nan")
    out = {
        "explain/scored_latents": float(explainability["scored_latents"]),
        "explain/scored_fraction": float(explainability["scored_fraction"]),
    }
    for name in ("precision", "recall", "f1"):
        figures = explainability[name]
        out[f"explain/{name}_mean"] = nan if figures["mean"] is None else figures["mean"]
        for q in ("0.1", "0.5", "0.9"):
            value = figures["quantiles"][q]
            out[f"explain/{name}_p{round(float(q) * 100)}"] = nan if value is None else value
    return out


def write_latent_dataset(
    stats: LatentStatistics,
    decode: Callable[[list[int]], list[str]],
    writer: DatasetWriter,
    about: dict[str, Any],
    cfg: LatentsConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the pages, the index chunks and summary.json (module docstring); returns the
    summary. about: what the summary says of the SAE (uri, sae_kind, k, d, hook, model, ...).
    decode: token ids -> their strings, one token each."""
    n = len(stats.fires)
    record = _Records(stats, token_texts(stats, decode), cfg.window_before)
    rows: list[dict[str, Any]] = []
    page: list[dict[str, Any]] = []
    for j in tqdm(range(n), desc="latent pages", unit="latent", disable=not progress):
        page.append(record(j))
        rows.append(index_row(page[-1]))
        if len(page) == PAGE_SIZE or j == n - 1:
            writer.write_bytes(f"latents/page-{j // PAGE_SIZE:05d}.json", _compact(page))
            page = []
    for start in range(0, n, INDEX_CHUNK):
        name = f"index/chunk-{start // INDEX_CHUNK:05d}.json"
        writer.write_bytes(name, _compact(rows[start : start + INDEX_CHUNK]))
    density = density_histogram(latent_density(stats.fires, stats.tokens), stats.tokens)
    summary = _clean({
        **about,
        "n_latents": n,
        "eval_tokens": stats.tokens,
        "explain_tokens": stats.explain_tokens,
        "heldout_tokens": stats.tokens - stats.explain_tokens,
        "dead_latents": int((stats.fires == 0).sum()),
        "density_histogram": density._asdict(),
        "explainability": explainability_summary(stats.precision, stats.recall, stats.scored),
        "layout": {"page_size": PAGE_SIZE, "index_chunk": INDEX_CHUNK,
                   "index_chunks": -(-n // INDEX_CHUNK)},
        "config": cfg.model_dump(mode="json"),
    })  # fmt: skip
    writer.write_bytes("summary.json", _compact(summary))
    return summary


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
