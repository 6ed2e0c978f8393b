"""Probe tasks from a labelled corpus: tag mapping, token alignment, the probe set, the probes."""

from __future__ import annotations

import random

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.evaluation.probe_data import (
    POS_CLASSES,
    build_probe_set,
    coarse_pos,
    has_labels,
    token_classes,
)
from sae_core.evaluation.probes import evaluate_probes, probe_summary
from sae_core.evaluation.splice import SplitModel
from sae_core.sae import TopKSAE
from tests.helpers.tiny_models import _WORDS, build_tiny_llama, build_tokenizer

CLASS = {name: i for i, name in enumerate(POS_CLASSES)}
# Brown tags for the generated vocabulary's word classes.
TAGS = {
    "det": "at",
    "adj": "jj",
    "noun": "nn",
    "verb": "vbd",
    "adv": "rb",
    "prep": "in",
    "name": "np-tl",
}


@pytest.mark.parametrize(
    "tag, expected",
    [
        ("nn", "noun"), ("nns-tl", "noun"), ("np$", "noun"), ("fw-nn", "noun"),
        ("vbd", "verb"), ("md*", "verb"), ("bedz", "verb"), ("jjt", "adjective"),
        ("rb", "adverb"), ("in-hl", "preposition"), ("at", "determiner"),
        ("pp$", "pronoun"), ("ppss+md", "pronoun"), ("cs", "conjunction"),
    ],
)  # fmt: skip
def test_coarse_pos_maps_brown_tags(tag, expected):
    assert coarse_pos(tag) == CLASS[expected]


@pytest.mark.parametrize("tag", [".", ",", "cd", "uh", "--", "``"])
def test_punctuation_and_rare_tags_stay_unlabelled(tag):
    assert coarse_pos(tag) == -1


def test_tokens_take_the_tag_of_the_word_holding_their_first_character():
    text = "The dog's bone ."
    spans = [[0, 3], [4, 9], [10, 14], [15, 16]]
    tags = ["at", "nn$", "nn", "."]
    # Byte-level style pieces: a leading space belongs to the next token.
    offsets = [(0, 3), (3, 7), (7, 9), (9, 14), (14, 15), (15, 16)]  # The| dog|'s| bone| |.
    got = token_classes(text, offsets, spans, tags).tolist()
    assert got == [CLASS["determiner"], CLASS["noun"], CLASS["noun"], CLASS["noun"], -1, -1]


def _tagged_docs(n_docs: int, seed: int = 0) -> list[dict]:
    """Documents over the test tokenizer's vocabulary with Brown-style tags and char spans."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        words, tags = [], []
        for _ in range(60):
            kind = rng.choice(list(TAGS))
            words.append(rng.choice(_WORDS[kind]))
            tags.append(TAGS[kind])
        spans, pos = [], 0
        for w in words:
            spans.append([pos, pos + len(w)])
            pos += len(w) + 1
        docs.append(
            {"doc_id": f"d{d}", "genre": ["news", "fiction"][d % 2], "text": " ".join(words),
             "words": words, "tags": tags, "spans": spans}
        )  # fmt: skip
    return docs


def test_probe_set_and_probes_on_a_tiny_model():
    import datasets

    corpus = datasets.Dataset.from_list(_tagged_docs(40))
    split = SplitModel(build_tiny_llama(), "resid_post.1")
    ps = build_probe_set(
        split, corpus, "text", build_tokenizer(), context_len=16, first_position=1,
        n_contexts=60, n_tokens=500, batch_contexts=8, progress=False,
    )  # fmt: skip
    assert ps.acts.shape == (60, 15, 64) and ps.pos.shape == (60, 15)
    assert ps.genres == ["fiction", "news"] and set(ps.genre.tolist()) == {0, 1}
    assert ps.token_sample.shape == (500, 2)
    assert bool((ps.pos[ps.token_sample[:, 0], ps.token_sample[:, 1]] >= 0).all())
    assert 0 < int(ps.train.sum()) < 60
    # Every token of these documents is a tagged word: adjectives are labelled as such.
    assert int((ps.pos == CLASS["adjective"]).sum()) > 0
    torch.manual_seed(0)
    sae = TopKSAE(64, SAEConfig(n_latents=96, k=4))
    results = evaluate_probes(sae, ps)
    tasks = {r.task for r in results}
    assert {"genre=news", "pos=noun", "pos=verb"} <= tasks
    assert "pos=pronoun" not in tasks  # the corpus has none
    for r in results:
        assert 0 <= r.latent < 96 and r.loss > 0 and r.baseline_loss > 0
    summary = probe_summary(results)
    assert set(summary) == {
        "probe_loss", "probe_baseline_loss", "probe_loss_sequence", "probe_loss_token"
    }  # fmt: skip


def test_only_a_labelled_corpus_gets_a_probe_set():
    import datasets

    plain = datasets.Dataset.from_list([{"text": "a b c"}])
    assert not has_labels(plain)
    assert has_labels(datasets.Dataset.from_list([{"text": "a", "genre": "news"}]))
    assert has_labels(datasets.Dataset.from_list(_tagged_docs(1)).remove_columns("genre"))
