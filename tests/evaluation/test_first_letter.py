"""The first-letter task's words, prompts and activations on the tiny model and tokenizer."""

from __future__ import annotations

import pytest
import torch

from sae_core.errors import ConfigError
from sae_core.evaluation.first_letter import (
    LETTERS,
    SUFFIX,
    build_letter_set,
    fit_letter_probes,
    letter_set_bytes,
    letter_set_from,
    single_token_words,
)
from sae_core.evaluation.metrics import f1_score
from sae_core.evaluation.splice import SplitModel
from tests.helpers.tiny_models import build_tiny_llama, build_tokenizer


def test_single_token_words_are_letters_only_and_not_special():
    tok = build_tokenizer()
    words = dict(single_token_words(tok))
    assert "house" in words.values() and "John" in words.values()
    assert not {".", "?", "[UNK]", "<|endoftext|>"} & set(words.values())
    assert all(tok.convert_ids_to_tokens(i) == w for i, w in words.items())


def test_letter_set_reads_each_word_at_its_own_token():
    tok, model = build_tokenizer(), build_tiny_llama(vocab_size=512)
    split = SplitModel(model, "resid_post.1")
    # Without examples a prompt is "\n" + word + SUFFIX: rebuild one by hand.
    bare = build_letter_set(split, tok, n_words=30, icl_examples=0, batch_prompts=7, seed=0)
    assert bare.acts.shape == (30, 64) and int(bare.train.sum()) == 24
    assert [LETTERS[i] for i in bare.letter] == [w.strip()[0].lower() for w in bare.words]
    sep = tok("\n", add_special_tokens=False)["input_ids"]
    suffix = tok(SUFFIX, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*sep, tok.convert_tokens_to_ids(bare.words[5]), *suffix]])
    with torch.inference_mode():
        alone = split.capture(ids).act[0, len(sep)]
    assert torch.allclose(bare.acts[5], alone, atol=1e-5)
    # With examples, batching prompts changes nothing.
    one = build_letter_set(split, tok, n_words=30, icl_examples=3, batch_prompts=1, seed=0)
    many = build_letter_set(split, tok, n_words=30, icl_examples=3, batch_prompts=7, seed=0)
    assert one.words == many.words and torch.allclose(one.acts, many.acts, atol=1e-5)
    assert not torch.allclose(one.acts, bare.acts)  # the examples reach the word
    again = letter_set_from(letter_set_bytes(many), many.words)
    assert torch.equal(again.acts, many.acts) and torch.equal(again.probe_w, many.probe_w)


def test_prompts_longer_than_the_model_are_one_line():
    tok, model = build_tokenizer(), build_tiny_llama(vocab_size=512)
    model.config.max_position_embeddings = 16
    with pytest.raises(ConfigError, match="lower saebench.icl_examples"):
        build_letter_set(SplitModel(model, "resid_post.1"), tok, 30, 10, 8, progress=False)


def test_letter_probes_find_separable_letters():
    g = torch.Generator().manual_seed(0)
    letter = torch.arange(260) % 26
    acts = torch.randn(260, 40, generator=g) * 0.1
    acts[torch.arange(260), letter] += 3.0  # letter i lives on dim i
    w, b = fit_letter_probes(acts * 50, letter)  # any overall scale
    predicted = (acts * 50) @ w + b > 0
    assert all(f1_score(predicted[:, c], letter == c) == 1.0 for c in range(26))
