"""Binary probe tasks from a labelled corpus (the Brown corpus: a genre per document, a
part-of-speech tag per word), with the model's activations at the hook.

How the tasks are built:
- Contexts: documents in a seeded order, each tokenised alone (no EOS, no neighbour) and cut
  into aligned windows of `context_len` tokens; one seeded window per document per round,
  round after round, until `n_contexts` windows (so every context lies in one document and has
  one genre). Documents shorter than a window are skipped.
- Split: documents are split in two halves by a seeded permutation; probes are fitted on the
  contexts of the first half and scored on the second, so a document never sits on both sides.
- Genre (sequence level): for each genre, "this context's document is of genre g" against
  the rest; the feature is the latent's mean over the context's positions >= first_position.
- Part of speech (token level): Brown tags are mapped to 8 coarse classes (`POS_CLASSES`;
  prefixes `fw-`, suffixes `-tl`/`-hl`/`-nc`, negation `*` and the possessive `$` are
  stripped, and a contraction `ppss+md` counts as its first part). A model token takes the
  tag of the word that holds its first non-space character (so every token of a word shares
  the word's class); tokens that are whitespace or punctuation outside any tagged word stay
  unlabelled. For each class: "this token belongs to a word of class c" against every other
  labelled token, on a seeded sample of `n_tokens` labelled tokens at positions >= first_position.
- A task is kept when each side of the split has at least MIN_POSITIVES positives and as many
  negatives.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor
from tqdm.auto import tqdm

from sae_core.errors import ConfigError
from sae_core.evaluation.splice import SplitModel

FILE = "probe_set.safetensors"
MIN_POSITIVES = 5
POS_CLASSES: dict[str, tuple[str, ...]] = {
    "noun": ("nn", "nns", "np", "nps", "nr", "nrs"),
    "verb": (
        *("vb", "vbd", "vbg", "vbn", "vbz", "md"),
        *("be", "bed", "bedz", "beg", "bem", "ben", "ber", "bez"),
        *("hv", "hvd", "hvg", "hvn", "hvz", "do", "dod", "doz"),
    ),
    "adjective": ("jj", "jjr", "jjs", "jjt"),
    "adverb": ("rb", "rbr", "rbt", "rn", "ql", "qlp", "wrb", "wql"),
    "preposition": ("in",),
    "determiner": ("at", "ap", "abn", "abx", "abl", "dt", "dti", "dts", "dtx", "wdt"),
    "pronoun": (
        "pn",
        "pp$",
        "pp$$",
        "ppl",
        "ppls",
        "ppo",
        "pps",
        "ppss",
        "wpo",
        "wps",
        "wp$",
        "ex",
    ),
    "conjunction": ("cc", "cs"),
}
_CLASS_OF = {tag: i for i, tags in enumerate(POS_CLASSES.values()) for tag in tags}


def coarse_pos(tag: str) -> int:
    """A Brown tag -> index into POS_CLASSES, or -1 (punctuation, numbers, rare classes)."""
    base = tag.lower().removeprefix("fw-").split("+")[0].split("-")[0].rstrip("*")
    if base not in _CLASS_OF and base.endswith("$"):
        base = base[:-1]  # possessive nouns: nn$ -> nn
    return _CLASS_OF.get(base, -1)


def token_classes(
    text: str, offsets: list[tuple[int, int]], spans: list[list[int]], tags: list[str]
) -> np.ndarray:
    """Coarse POS class of each token ([n_tokens] int64, -1 unlabelled).

    offsets: the tokenizer's (start, end) characters per token; spans: [start, end] of each
    word in `text`; tags: one per word.
    """
    starts = np.asarray([s for s, _ in spans], dtype=np.int64)
    ends = np.asarray([e for _, e in spans], dtype=np.int64)
    classes = np.asarray([coarse_pos(t) for t in tags], dtype=np.int64)
    out = np.full(len(offsets), -1, dtype=np.int64)
    for i, (s, e) in enumerate(offsets):
        piece = text[s:e]
        stripped = len(piece) - len(piece.lstrip())
        if stripped == len(piece):
            continue  # whitespace only
        char = s + stripped
        word = int(np.searchsorted(starts, char, side="right")) - 1
        if word >= 0 and char < ends[word]:
            out[i] = classes[word]
    return out


class ProbeSet(NamedTuple):
    """Probe contexts, their labels and the model's activations at the hook."""

    acts: Tensor  # [C, P, d] activations at positions first_position .. T - 1
    genre: Tensor  # [C] int64 index into `genres`, -1 when the corpus has none
    pos: Tensor  # [C, P] int64 index into POS_CLASSES, -1 unlabelled (same positions as acts)
    train: Tensor  # [C] bool: the context's document is in the fitting half
    token_sample: Tensor  # [S, 2] int64 (context, position index into P) for token tasks
    genres: list[str]


class _Contexts(NamedTuple):
    ids: Tensor  # [C, T]
    genre: Tensor  # [C]
    pos: Tensor  # [C, T]
    train: Tensor  # [C]
    genres: list[str]


def _windows(
    corpus: Any,
    text_column: str,
    tokenizer: Any,
    T: int,
    n_contexts: int,
    seed: int,
    progress: bool,
) -> _Contexts:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(corpus))
    # Drawn apart from `order`: the documents used (a prefix of it) split about evenly.
    fit_half = set(rng.permutation(len(corpus))[: len(corpus) // 2].tolist())
    has_genre = "genre" in corpus.column_names
    has_pos = {"tags", "spans"} <= set(corpus.column_names)
    genres = sorted({str(g) for g in corpus["genre"]}) if has_genre else []
    # Per document: its windows (aligned, non-overlapping), in a seeded order.
    pending: list[tuple[int, list[tuple[np.ndarray, np.ndarray]]]] = []
    docs = tqdm(order.tolist(), desc="probe contexts", unit="doc", disable=not progress)
    for row in docs:
        if len(pending) >= n_contexts:
            break  # one window per document already fills the set
        doc = corpus[row]
        enc = tokenizer(
            doc[text_column], add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if ids.size < T:
            continue
        labels = (
            token_classes(doc[text_column], enc["offset_mapping"], doc["spans"], doc["tags"])
            if has_pos
            else np.full(ids.size, -1, dtype=np.int64)
        )
        starts = rng.permutation(ids.size // T) * T
        pending.append((row, [(ids[s : s + T], labels[s : s + T]) for s in starts]))
    chosen: list[tuple[int, np.ndarray, np.ndarray]] = []
    while len(chosen) < n_contexts and any(w for _, w in pending):
        for row, windows in pending:
            if windows and len(chosen) < n_contexts:
                chosen.append((row, *windows.pop(0)))
    if not chosen:
        raise ConfigError(
            f"eval.probe_contexts: no document of the corpus has {T} tokens; "
            "lower data.context_len or set eval.probe_contexts=0"
        )
    rows = [row for row, _, _ in chosen]
    genre_of = {g: i for i, g in enumerate(genres)}
    return _Contexts(
        ids=torch.from_numpy(np.stack([ids for _, ids, _ in chosen])),
        genre=torch.tensor(
            [genre_of[str(corpus[r]["genre"])] if has_genre else -1 for r in rows],
            dtype=torch.int64,
        ),
        pos=torch.from_numpy(np.stack([lab for _, _, lab in chosen])),
        train=torch.tensor([r in fit_half for r in rows]),
        genres=genres,
    )


def has_labels(corpus: Any) -> bool:
    """Whether a corpus (`datasets.Dataset`) carries genres or part-of-speech tags."""
    return "genre" in corpus.column_names or {"tags", "spans"} <= set(corpus.column_names)


def build_probe_set(
    split: SplitModel,
    corpus: Any,
    text_column: str,
    tokenizer: Any,
    context_len: int,
    first_position: int,
    n_contexts: int,
    n_tokens: int,
    batch_contexts: int,
    seed: int = 0,
    progress: bool = True,
) -> ProbeSet:
    """Contexts and labels from `corpus` (a `datasets.Dataset` with `text_column` and
    optionally `genre`, `tags` and `spans` columns), with activations from the part of the
    model below the hook. Cost: that part over n_contexts x context_len tokens."""
    ctx = _windows(corpus, text_column, tokenizer, context_len, n_contexts, seed, progress)
    device = next(split.model.parameters()).device
    acts = []
    batches = range(0, ctx.ids.shape[0], batch_contexts)
    with torch.inference_mode():
        for start in tqdm(batches, desc="probe activations", unit="batch", disable=not progress):
            act = split.capture(ctx.ids[start : start + batch_contexts].to(device)).act
            acts.append(act[:, first_position:].cpu())
    pos = ctx.pos[:, first_position:]
    labelled = (pos >= 0).nonzero()
    g = torch.Generator().manual_seed(seed)
    token_sample = labelled[torch.randperm(labelled.shape[0], generator=g)[:n_tokens]]
    return ProbeSet(torch.cat(acts), ctx.genre, pos, ctx.train, token_sample, ctx.genres)


def probe_set_bytes(ps: ProbeSet) -> bytes:
    tensors = {
        "acts": ps.acts,
        "genre": ps.genre,
        "pos": ps.pos,
        "train": ps.train,
        "token_sample": ps.token_sample,
    }
    return save_tensors({k: v.contiguous() for k, v in tensors.items()})


def probe_set_from(data: bytes, genres: list[str]) -> ProbeSet:
    """The inverse of `probe_set_bytes`, with the genre names the dataset's manifest holds."""
    t = load_tensors(data)
    return ProbeSet(t["acts"], t["genre"], t["pos"], t["train"], t["token_sample"], genres)
