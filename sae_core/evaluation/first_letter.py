"""SAEBench's first-letter task (Karvonen et al. 2025, `evals/absorption`, after Chanin et al.
"A is for Absorption"), written here: the words, the prompts, the activations and the
ground-truth probes the absorption metric (sae_core.evaluation.absorption) reads.

- Words: the tokenizer's single-token words, tokens that decode to ASCII letters only, after
  at most one leading space (SAEBench's get_alpha_tokens); a seeded sample of `n_words` of them
  (SAEBench uses all: a CPU cannot), split 80/20 into fitting and held-out words.
- Prompts: SAEBench's template "{word} has the first letter:" with `icl_examples` in-context
  examples "{example} has the first letter: {LETTER}", one per line, a line break first; the
  examples are drawn from the word's own half, never the word itself. Prompts are built as
  token ids, piece by piece, so the word stays one token at a known position.
- Activations: the hook's activation at the word's token.
- Ground-truth probes: 26 one-against-the-rest logistic regressions on the fitting words'
  activations (classes balanced, as SAEBench's pos-weighted probes); stored as raw-space
  weights [d, 26] and biases [26].
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
from sae_core.evaluation.metrics import fit_logistic
from sae_core.evaluation.splice import SplitModel

FILE = "letter_set.safetensors"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
SUFFIX = " has the first letter:"  # the template after "{word}"
SEPARATOR = "\n"
TRAIN_FRACTION = 0.8
PROBE_L2 = 1e-4  # SAEBench's probe weight decay


class LetterSet(NamedTuple):
    """Single-token words, their activations at the hook and the ground-truth letter probes."""

    acts: Tensor  # [W, d] float32 activation at the word's token
    letter: Tensor  # [W] int64 index into LETTERS of the word's first letter
    train: Tensor  # [W] bool: a fitting word (else held out)
    probe_w: Tensor  # [d, 26] float32 raw-space probe weights
    probe_b: Tensor  # [26] float32 probe biases
    words: list[str]


def single_token_words(tokenizer: Any) -> list[tuple[int, str]]:
    """(token id, text) of every non-special token that is letters only after at most one
    leading space, by id."""
    special = set(tokenizer.all_special_ids)
    words = []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        if token_id in special:
            continue
        text = tokenizer.convert_tokens_to_string([token])
        body = text[1:] if text.startswith(" ") else text
        if body and body.isascii() and body.isalpha():
            words.append((token_id, text))
    return words


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompts(
    tokenizer: Any, chosen: list[tuple[int, str]], train: np.ndarray, icl: int, seed: int
) -> list[list[int]]:
    """Token ids of each word's prompt; the word is the token before the final SUFFIX."""
    sep, suffix = _ids(tokenizer, SEPARATOR), _ids(tokenizer, SUFFIX)
    answer = {c: _ids(tokenizer, " " + c.upper()) for c in LETTERS}
    rng = np.random.default_rng(seed + 1)
    halves = {flag: np.flatnonzero(train == flag) for flag in (True, False)}
    prompts = []
    for i, (token_id, _) in enumerate(chosen):
        pool = halves[bool(train[i])]
        pool = pool[pool != i]
        ids = list(sep)
        for j in rng.choice(pool, size=min(icl, pool.size), replace=False):
            example_id, text = chosen[j]
            ids += [example_id, *suffix, *answer[text.strip()[0].lower()], *sep]
        prompts.append([*ids, token_id, *suffix])
    return prompts


def _word_activations(
    split: SplitModel, prompts: list[list[int]], word_from_end: int, batch: int, progress: bool
) -> Tensor:
    """[W, d]: each prompt's activation at position len - word_from_end; prompts of one length
    run together (no padding, so no attention mask is needed)."""
    device = next(split.model.parameters()).device
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    out: Tensor | None = None
    steps = [rows[s : s + batch] for rows in by_length.values() for s in range(0, len(rows), batch)]
    with torch.inference_mode():
        for rows in tqdm(steps, desc="first-letter prompts", unit="batch", disable=not progress):
            ids = torch.tensor([prompts[r] for r in rows], device=device)
            act = split.capture(ids).act[:, -word_from_end].float().cpu()
            if out is None:
                out = torch.empty(len(prompts), act.shape[-1])
            out[rows] = act
    assert out is not None
    return out


def fit_letter_probes(acts: Tensor, letter: Tensor) -> tuple[Tensor, Tensor]:
    """One-against-the-rest logistic probes per letter: acts [N, d], letter [N] ->
    (weights [d, 26], biases [26]) in raw space. The activations are scaled by one scalar
    (their mean norm) for the fit, which leaves every probe's direction unchanged."""
    scale = float(acts.norm(dim=-1).mean().clamp_min(1e-12))
    onehot = torch.nn.functional.one_hot(letter, len(LETTERS)).double()
    fit = fit_logistic(acts / scale, onehot, l2=PROBE_L2)
    return (fit.w / scale).float(), fit.b.float()


def build_letter_set(
    split: SplitModel,
    tokenizer: Any,
    n_words: int,
    icl_examples: int,
    batch_prompts: int,
    seed: int = 0,
    progress: bool = True,
) -> LetterSet:
    """The first-letter task on the model cut at the hook. Cost: the part below the hook over
    n_words prompts of about 1 + icl_examples (2 + |suffix| + |answer|) tokens each."""
    vocab = single_token_words(tokenizer)
    if len(vocab) < 2 * len(LETTERS):
        raise ConfigError(
            f"saebench.absorption_words: the tokenizer has only {len(vocab)} single-token "
            "words; set saebench.absorption_words=0 to skip absorption"
        )
    rng = np.random.default_rng(seed)
    chosen = [vocab[i] for i in rng.permutation(len(vocab))[:n_words]]
    train = np.arange(len(chosen)) < round(TRAIN_FRACTION * len(chosen))
    prompts = _prompts(tokenizer, chosen, train, icl_examples, seed)
    config = split.model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", 0
    )
    longest = max(len(ids) for ids in prompts)
    if positions and longest > positions:
        raise ConfigError(
            f"saebench.icl_examples={icl_examples}: a first-letter prompt has {longest} tokens, "
            f"more than the model's {positions} positions; lower saebench.icl_examples"
        )
    from_end = 1 + len(_ids(tokenizer, SUFFIX))
    acts = _word_activations(split, prompts, from_end, batch_prompts, progress)
    letter = torch.tensor([LETTERS.index(text.strip()[0].lower()) for _, text in chosen])
    train_t = torch.from_numpy(train)
    probe_w, probe_b = fit_letter_probes(acts[train_t], letter[train_t])
    return LetterSet(acts, letter, train_t, probe_w, probe_b, [text for _, text in chosen])


def letter_set_bytes(ls: LetterSet) -> bytes:
    tensors = {
        "acts": ls.acts,
        "letter": ls.letter,
        "train": ls.train,
        "probe_w": ls.probe_w,
        "probe_b": ls.probe_b,
    }
    return save_tensors({k: v.contiguous() for k, v in tensors.items()})


def letter_set_from(data: bytes, words: list[str]) -> LetterSet:
    """The inverse of `letter_set_bytes`, with the words the dataset's manifest holds."""
    t = load_tensors(data)
    return LetterSet(t["acts"], t["letter"], t["train"], t["probe_w"], t["probe_b"], words)
