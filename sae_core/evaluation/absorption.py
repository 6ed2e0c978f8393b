"""Feature absorption on the first-letter task: SAEBench's definitions (Karvonen et al. 2025,
`evals/absorption`: Chanin et al.'s full absorption and Till's absorption fraction), written
here. The task's words, activations and ground-truth probes: sae_core.evaluation.first_letter.

Per letter:
1. Main latents (SAEBench's k-sparse probing with feature-split detection): latents ranked by
   their mean activation on the letter's fitting words minus on the others (SAEBench ranks by
   an L1-regularised probe's weights; the mean difference is its sparse-probing eval's
   ranking, and needs no training); for k = 1 .. max_k a logistic probe on the top k, scored
   by F1 on the held-out words; k grows while F1 rises by more than `f1_jump` (0.03). The
   main latents are the top k where it stopped.
2. The letter is evaluated when its ground-truth probe's held-out F1 exceeds `min_probe_f1`
   (0.6); its words are the held-out words of the letter on which the probe fires (probe
   logit > 0: the probe's true positives).
3. On each such word, with p the probe's unit direction, the word's probe projection x . p,
   and each latent's projection a_i s cos(d_i, p) (its activation a_i times the token's input
   scale s, so that it is the latent's term of the raw reconstruction, and the cosine of its
   decoder direction d_i with p):
   - full absorption: no main latent fires (a_i < 1e-8), the latent with the largest
     projection has cos >= 0.025, x . p >= 0, and that latent's projection is >= 0.4 x . p;
   - absorption fraction: absorbers are other latents with cos >= 0.1 and a positive
     projection, the 3 largest summed (A); with M the main latents' summed projection: 0 when
     M >= x . p or A < 0.4 x . p; else 1 when M <= 0; else min(A, x . p - M) / (that + M).
4. Full absorption rate and mean absorption fraction: sums over the words / the probe's true
   positives.
Scores: the means over evaluated letters (mean_full_absorption_score and
mean_absorption_fraction_score in SAEBench), when at least `min_letters` letters are evaluated
(SAEBench: 20); fewer, and only absorption_letters is reported.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_core.evaluation.first_letter import LETTERS, LetterSet
from sae_core.evaluation.metrics import f1_score, fit_logistic
from sae_core.sae import SparseAutoencoder

FULL_ABSORPTION_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
FIRES = 1e-8


class LetterAbsorption(NamedTuple):
    letter: str
    probe_f1: float  # held-out F1 of the ground-truth probe
    main_latents: list[int]
    probe_true_positives: int  # held-out words of the letter the probe detects
    full_absorption_rate: float
    absorption_fraction: float  # mean over the probe's true positives


class WordScores(NamedTuple):
    full: Tensor  # [M] bool: fully absorbed
    fraction: Tensor  # [M] float64 absorption fraction


def sae_codes(sae: SparseAutoencoder, x: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Dense activations [N, n] of raw x [N, d] and each token's input scale [N] (the factor
    from normalised to raw space: a latent's raw decoder term is a_i s d_i)."""
    acts = torch.zeros(x.shape[0], sae.n_latents)
    scale = torch.empty(x.shape[0])
    for start in range(0, x.shape[0], chunk):
        codes = sae.encode(x[start : start + chunk].to(sae.b_pre.device).float())
        acts[start : start + chunk].scatter_(1, codes.idx.cpu(), codes.vals.float().cpu())
        rows = codes.idx.shape[0]
        scale[start : start + rows] = codes.stats.scale.float().cpu().reshape(-1).expand(rows)
    return acts, scale


def main_latents(
    train_a: Tensor,
    train_y: Tensor,
    test_a: Tensor,
    test_y: Tensor,
    max_k: int,
    f1_jump: float,
) -> list[int]:
    """The letter's main latents (step 1 of the module). *_a: [N, n] activations; *_y: [N] bool."""
    gap = train_a[train_y].double().mean(0) - train_a[~train_y].double().mean(0)
    ranked = gap.topk(min(max_k, gap.shape[0])).indices
    best, chosen = -float("inf"), []
    for k in range(1, ranked.shape[0] + 1):
        cols = ranked[:k]
        fit = fit_logistic(train_a[:, cols], train_y.double()[:, None], l2=1.0 / train_a.shape[0])
        f1 = f1_score(fit.logits(test_a[:, cols])[:, 0] > 0, test_y)
        if f1 <= best + f1_jump:
            break
        best, chosen = f1, cols.tolist()
    return chosen


def word_scores(
    x: Tensor, acts: Tensor, scale: Tensor, cos: Tensor, direction: Tensor, main: list[int]
) -> WordScores:
    """Full absorption and absorption fraction of M words (step 3 of the module).

    x: [M, d] raw activations; acts: [M, n] the SAE's activations; scale: [M]; cos: [n] decoder
    directions' cosines with the probe; direction: [d] the probe's unit direction."""
    probe_proj = x.double() @ direction.double()  # [M]
    proj = acts.double() * scale.double()[:, None] * cos.double()  # [M, n]
    is_main = torch.zeros(acts.shape[1], dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(1)
    absorbers = proj.masked_fill(is_main | (cos < FRACTION_COS), 0.0).clamp_min(0.0)
    absorbed = absorbers.topk(min(MAX_ABSORBERS, absorbers.shape[1]), dim=1).values.sum(1)
    share = absorbed / probe_proj
    unexplained = torch.minimum(absorbed, probe_proj - main_proj)
    partial = (unexplained / (unexplained + main_proj)).clamp(0.0, 1.0)
    fraction = torch.where(main_proj <= 0, 1.0, partial)
    fraction = torch.where((main_proj >= probe_proj) | (share < PROJECTION_SHARE), 0.0, fraction)

    top = proj.argmax(dim=1)
    top_proj = proj.gather(1, top[:, None])[:, 0]
    full = (
        (acts[:, is_main] < FIRES).all(dim=1)
        & (cos[top] >= FULL_ABSORPTION_COS)
        & (probe_proj >= 0)
        & (top_proj >= PROJECTION_SHARE * probe_proj)
    )
    return WordScores(full, fraction)


def letter_absorption(
    sae: SparseAutoencoder, ls: LetterSet, max_k: int = 10, f1_jump: float = 0.03
) -> list[LetterAbsorption]:
    """Steps 1-4 of the module for every letter with a held-out word (evaluated or not)."""
    acts, scale = sae_codes(sae, ls.acts)
    with torch.no_grad():
        decoder = F.normalize(sae.dense_decoder().detach().float().cpu(), dim=-1)
    train, test = ls.train, ~ls.train
    logits = ls.acts.double() @ ls.probe_w.double() + ls.probe_b.double()  # [W, 26]
    results = []
    for c, letter in enumerate(LETTERS):
        is_letter = ls.letter == c
        if not bool((is_letter & test).any()) or not bool((is_letter & train).any()):
            continue
        probe_f1 = f1_score(logits[test, c] > 0, is_letter[test])
        main = main_latents(
            acts[train], is_letter[train], acts[test], is_letter[test], max_k, f1_jump
        )
        words = test & is_letter & (logits[:, c] > 0)
        full_rate = fraction = 0.0
        if bool(words.any()):
            direction = F.normalize(ls.probe_w[:, c].float(), dim=0)
            scores = word_scores(
                ls.acts[words], acts[words], scale[words], decoder @ direction, direction, main
            )
            full_rate = float(scores.full.double().mean())
            fraction = float(scores.fraction.mean())
        results.append(
            LetterAbsorption(letter, probe_f1, main, int(words.sum()), full_rate, fraction)
        )
    return results


def absorption_summary(
    letters: list[LetterAbsorption], min_probe_f1: float = 0.6, min_letters: int = 20
) -> dict[str, float]:
    """absorption_full, absorption_fraction, absorption_split_latents (mean main latents) over
    the letters whose probe F1 exceeds min_probe_f1 and that have a true positive, when there
    are at least min_letters of them; absorption_letters (how many) always."""
    chosen = [r for r in letters if r.probe_f1 > min_probe_f1 and r.probe_true_positives]
    out = {"absorption_letters": float(len(chosen))}
    if chosen and len(chosen) >= min_letters:
        out["absorption_full"] = sum(r.full_absorption_rate for r in chosen) / len(chosen)
        out["absorption_fraction"] = sum(r.absorption_fraction for r in chosen) / len(chosen)
        out["absorption_split_latents"] = sum(len(r.main_latents) for r in chosen) / len(chosen)
    return out
