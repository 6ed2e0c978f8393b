"""Feature absorption on a planted first-letter task: words as activations with known features,
hand-set ground-truth probes, and SAEs built to absorb (or not)."""

from __future__ import annotations

import math

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.evaluation.absorption import (
    absorption_summary,
    letter_absorption,
    main_latents,
    word_scores,
)
from sae_core.evaluation.first_letter import LETTERS, LetterSet
from sae_core.sae import TopKSAE

D = 8
A, B, C, SHORT = 0, 1, 2, 3  # feature dims: first letter a, b, c; "a short a-word" (absorbed)


def _letter_set() -> LetterSet:
    """40 words per letter a, b, c (activation 2 on the letter's dim, noise on dims 4-7); a
    quarter of the a-words also carry SHORT. The first 32 of each letter fit, 8 are held out,
    2 of the held-out a-words carry SHORT. Probes: 5 x_letter - 5."""
    g = torch.Generator().manual_seed(0)
    rows, letters, train = [], [], []
    for c in (A, B, C):
        for i in range(40):
            x = torch.zeros(D)
            x[4:] = 0.05 * torch.rand(4, generator=g)
            x[c] = 2.0
            if c == A and i % 4 == 0:
                x[SHORT] = 2.0
            rows.append(x)
            letters.append(c)
            train.append(i < 32)
    probe_w = torch.zeros(D, len(LETTERS))
    for c in (A, B, C):
        probe_w[c, c] = 5.0
    words = [f"w{i}" for i in range(len(rows))]
    return LetterSet(
        torch.stack(rows),
        torch.tensor(letters),
        torch.tensor(train),
        probe_w,
        torch.full((len(LETTERS),), -5.0),
        words,
    )


def _sae(absorbing: bool, k: int = 1) -> TopKSAE:
    """Latents 0-2 read and write a, b, c; latent 3 reads SHORT; 4-7 the noise dims.
    absorbing: latent 0 is silenced by SHORT (encoder e_a - e_short) and latent 3 writes the
    a-direction with it ((e_a + e_short) / sqrt 2): on short a-words it fires instead of
    latent 0 and carries the probe's direction. Otherwise latent 0 reads e_a and latent 3
    writes e_short only."""
    sae = TopKSAE(D, SAEConfig(n_latents=D, k=k, normalize="none"))
    enc, dec = torch.eye(D), torch.eye(D)
    if absorbing:
        enc[0, SHORT] = -1.0
        dec[3] = (torch.eye(D)[A] + torch.eye(D)[SHORT]) / math.sqrt(2)
    with torch.no_grad():
        sae.W_enc.copy_(enc)
        sae.W_dec.copy_(dec)
        sae.b_enc.zero_()
        sae.b_pre.zero_()
    return sae.eval()


def _by_letter(results):
    return {r.letter: r for r in results}


def test_a_planted_absorbing_latent_is_detected():
    got = _by_letter(letter_absorption(_sae(absorbing=True), _letter_set(), max_k=1))
    a = got["a"]
    assert a.main_latents == [0] and a.probe_f1 == 1.0 and a.probe_true_positives == 8
    assert a.full_absorption_rate == pytest.approx(2 / 8)  # the two held-out short a-words
    assert a.absorption_fraction == pytest.approx(2 / 8)  # each fully absorbed: fraction 1
    for other in ("b", "c"):
        assert got[other].full_absorption_rate == got[other].absorption_fraction == 0.0
    summary = absorption_summary(list(got.values()), min_letters=3)
    assert summary["absorption_full"] == pytest.approx(0.25 / 3)
    assert summary["absorption_letters"] == 3


def test_without_the_absorbing_latent_nothing_is_absorbed():
    got = _by_letter(letter_absorption(_sae(absorbing=False, k=2), _letter_set(), max_k=1))
    assert all(r.full_absorption_rate == r.absorption_fraction == 0.0 for r in got.values())


def test_a_latent_covering_a_quarter_of_the_letter_is_a_split_not_absorption():
    # SAEBench's F1-jump rule: adding latent 3 lifts held-out F1 from 6/7 to 1 (> 0.03), so
    # it joins the main latents and the short a-words are no longer counted as absorbed.
    got = _by_letter(letter_absorption(_sae(absorbing=True), _letter_set(), max_k=10))
    assert got["a"].main_latents == [0, 3]
    assert got["a"].full_absorption_rate == got["a"].absorption_fraction == 0.0


def test_main_latents_stop_when_f1_gains_little():
    # Latent 0 marks 95 of 100 positives, latent 1 the other 5: F1 0.974 -> 1 gains 0.026.
    y = torch.arange(400) < 100
    acts = torch.zeros(400, 3)
    acts[:95, 0] = 1.0
    acts[95:100, 1] = 1.0
    acts[200:, 2] = 1.0  # fires on negatives: ranked last
    assert main_latents(acts, y, acts, y, max_k=3, f1_jump=0.03) == [0]
    assert main_latents(acts, y, acts, y, max_k=3, f1_jump=0.02) == [0, 1]


def test_partial_absorption_fraction_by_hand():
    # One word, probe direction e0, x . p = 2. Main latent 0 carries 0.5 of it; latent 1
    # (cos 0.8) carries 1.2: share 0.6 >= 0.4, absorbed min(1.2, 2 - 0.5) = 1.2 of 1.7.
    x = torch.tensor([[2.0, 0.0]])
    acts = torch.tensor([[0.5, 1.5]])
    cos = torch.tensor([1.0, 0.8])
    scores = word_scores(x, acts, torch.ones(1), cos, torch.tensor([1.0, 0.0]), main=[0])
    assert scores.fraction.item() == pytest.approx(1.2 / 1.7)
    assert not scores.full.item()  # the main latent fired


def test_too_few_letters_give_no_score():
    got = letter_absorption(_sae(absorbing=True), _letter_set(), max_k=1)
    assert absorption_summary(got, min_letters=20) == {"absorption_letters": 3.0}
