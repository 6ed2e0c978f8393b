"""Quality per token: training recipes against each other and against EleutherAI sparsify, at
token budgets, on one stored activations dataset read in one order.

For every recipe and budget an SAE is trained from scratch on the dataset's `train` split
(`train.tokens` = the budget, the pipeline's own loader and batch order), then scored on the
held-out `eval` split:
- fvu: sum ||x - x_hat||^2 / sum ||x - mean||^2 on the raw activations, the one reconstruction
  figure every SAE library computes alike (sparsify trains on it);
- nmse: the same in the SAE's normalised space (the pipeline's `nmse`; sparsify: = fvu);
- nmse_per_token: the same with every token centred over d and scaled to unit norm (x's shift
  and scale applied to x and x_hat alike), so each token counts alike as in the paper's
  normalisation; the same definition for every trainer, whatever its own normalisation;
- ce_loss_recovered: the eval contexts' next-token CE with x_hat spliced in at the hook,
  against the clean model and zero ablation, on the first `ce_contexts` eval contexts.

sparsify (`sae_core.bench.sparsify_peer`, run by another Python that has `eai-sparsify`) trains
on the same batches in the same order with its Trainer's defaults (FVU loss, SignSGD under a
schedule-free wrapper, no AuxK) and saves its averaged weights at each budget; they are scored
here by the same code.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor

from sae_core.config import SAEConfig, TrainConfig
from sae_core.evaluation.baseline import Baseline, compute_baseline, with_tail
from sae_core.evaluation.evaluate import load_eval_contexts
from sae_core.evaluation.metrics import VarianceStats, ce_loss_recovered, next_token_ce
from sae_core.evaluation.splice import SplitModel
from sae_core.sae.normalize import InputNorm
from sae_core.storage.loader import iter_batches
from sae_core.storage.manifests import ActivationsManifest
from sae_core.storage.refs import DatasetRef, committed_dataset
from sae_core.training.group import run_training

Reconstruct = Callable[[Tensor], Tensor]  # [N, d] raw -> [N, d] raw


class RecipePoint(NamedTuple):
    """One trained SAE of the study, scored on the held-out split."""

    trainer: str
    """The recipe (`paper`, `budget`) or `sparsify`."""
    budget: int
    """Training tokens asked for."""
    tokens: int
    """Training tokens seen (whole batches)."""
    steps: int
    """Optimiser steps."""
    batch_size: int
    """Tokens per step."""
    peak_lr: float
    """The learning rate after warm-up."""
    fvu: float
    """Held-out unexplained variance of the raw activations."""
    nmse: float
    """Held-out unexplained variance in the SAE's normalised space."""
    ce_loss_recovered: float
    """Held-out CE loss recovered (zero ablation) on the scored contexts."""
    dead_fraction: float
    """Latents that never fired in training."""
    train_seconds: float
    """Wall time of the training."""
    nmse_per_token: float | None = None
    """Held-out unexplained variance in the per-token normalised space (None: a point saved
    before it was measured)."""


class Scorer:
    """Scores reconstructions on the held-out split: fvu on every eval row, CE loss recovered on
    the first `ce_contexts` eval contexts (the part of the model above the hook, in float32)."""

    def __init__(self, acts: DatasetRef, model: torch.nn.Module, ce_contexts: int, batch: int = 16):
        manifest = acts.manifest(ActivationsManifest)
        self.x_eval = next(iter_batches(acts, "eval", manifest.splits["eval"].rows, seed=0))
        self.first = 1 if manifest.skip_first_position else 0
        self.split = SplitModel(model, manifest.hook)
        tokens = committed_dataset(manifest.tokens.uri, "tokens")
        self.contexts = load_eval_contexts(tokens)[:ce_contexts]
        self.batch = batch
        self.baseline: Baseline = compute_baseline(
            self.split, self.contexts, batch, self.first, progress=False
        )
        self.ce_clean = self._ce(lambda act: act)

    def _ce(self, edit: Callable[[Tensor], Tensor]) -> float:
        total, terms = 0.0, 0
        with torch.inference_mode():
            for start in range(0, self.contexts.shape[0], self.batch):
                ids = self.contexts[start : start + self.batch]
                act = self.baseline.act[start : start + self.batch]
                logits = self.split.logits(ids, edit(act))
                total += float(next_token_ce(logits, ids, self.first))  # a sum over the batch
                terms += ids.shape[0] * (ids.shape[1] - 1 - self.first)
        return total / terms

    def fvu(self, reconstruct: Reconstruct) -> float:
        stats = VarianceStats()
        with torch.inference_mode():
            for start in range(0, self.x_eval.shape[0], 4096):
                x = self.x_eval[start : start + 4096]
                stats.update(x, reconstruct(x))
        return stats.result()

    def nmse_per_token(self, reconstruct: Reconstruct) -> float:
        """fvu in the per-token normalised space: x's shift and scale applied to x and x_hat."""
        per_token = InputNorm("per_token")
        stats = VarianceStats()
        with torch.inference_mode():
            for start in range(0, self.x_eval.shape[0], 4096):
                x = self.x_eval[start : start + 4096]
                x_norm, (shift, scale) = per_token.apply(x)
                stats.update(x_norm, (reconstruct(x) - shift) / scale)
        return stats.result()

    def spliced_ce(self, reconstruct: Reconstruct) -> float:
        """Mean next-token CE with x_hat spliced in at the hook (positions >= first)."""

        def spliced(act: Tensor) -> Tensor:
            tail = act[:, self.first :]
            x_hat = reconstruct(tail.reshape(-1, tail.shape[-1]).float())
            return with_tail(act, self.first, x_hat.reshape(tail.shape).to(act.dtype))

        return self._ce(spliced)

    def ce_loss_recovered(self, reconstruct: Reconstruct) -> float:
        zero = self.baseline.ce_sums["zero"] / self.baseline.terms
        return ce_loss_recovered(self.ce_clean, self.spliced_ce(reconstruct), zero)


def train_recipe(
    acts: DatasetRef, sae_cfg: SAEConfig, train_cfg: TrainConfig, scorer: Scorer
) -> RecipePoint:
    """Train one SAE on `acts` with `train_cfg` (its recipe and train.tokens) and score it."""
    manifest = acts.manifest(ActivationsManifest)
    rows = manifest.splits["train"].rows
    B = train_cfg.batch_size

    def source(epoch: int, start: int):
        return iter_batches(acts, "train", B, train_cfg.seed, epoch, start)

    start = time.perf_counter()
    trainer = run_training(
        manifest.width,
        sae_cfg,
        train_cfg,
        source,
        rows // B,
        lambda: next(iter_batches(acts, "train", min(32_768, rows), train_cfg.seed + 1)),
        progress=False,
    )
    seconds = time.perf_counter() - start
    sae = trainer.final_sae().eval()

    def normalised_nmse() -> float:
        stats = VarianceStats()
        with torch.inference_mode():
            for i in range(0, scorer.x_eval.shape[0], 4096):
                x = scorer.x_eval[i : i + 4096]
                codes = sae.encode(x)
                shift, scale = codes.stats
                stats.update((x - shift) / scale, (sae.decode(*codes) - shift) / scale)
        return stats.result()

    st = trainer.state
    return RecipePoint(
        trainer=train_cfg.recipe,
        budget=train_cfg.tokens or st.tokens_seen,
        tokens=st.tokens_seen,
        steps=st.step,
        batch_size=B,
        peak_lr=trainer.lr,
        fvu=scorer.fvu(sae.reconstruct),
        nmse=normalised_nmse(),
        ce_loss_recovered=scorer.ce_loss_recovered(sae.reconstruct),
        dead_fraction=trainer.dead.fraction(max(st.tokens_seen, 1)),
        train_seconds=seconds,
        nmse_per_token=scorer.nmse_per_token(sae.reconstruct),
    )


def sparsify_reconstruct(weights: dict[str, Tensor], k: int) -> Reconstruct:
    """sparsify's TopK SAE forward from its saved tensors (encoder.weight [n, d], encoder.bias
    [n], W_dec [n, d], b_dec [d]): ReLU of the pre-activations of x - b_dec, the top k kept."""
    W_enc, b_enc = weights["encoder.weight"], weights["encoder.bias"]
    W_dec, b_dec = weights["W_dec"], weights["b_dec"]

    def reconstruct(x: Tensor) -> Tensor:
        pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
        vals, idx = pre.topk(k, dim=-1)
        return (vals.unsqueeze(-1) * W_dec[idx]).sum(dim=1) + b_dec

    return reconstruct


def run_sparsify(
    python: str,
    acts: DatasetRef,
    n_latents: int,
    k: int,
    batch_size: int,
    budgets: list[int],
    seed: int,
    scorer: Scorer,
) -> list[RecipePoint]:
    """Train sparsify once to the largest budget in a subprocess of `python` (which has
    eai-sparsify; this repository on its path), saving its weights at each budget, and score
    each. Its optimiser has no schedule, so its weights after `b` tokens are those of a run of
    budget b."""
    repo = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="saeflow-sparsify-") as out:
        args = {
            "activations": acts.uri,
            "n_latents": n_latents,
            "k": k,
            "batch_size": batch_size,
            "budgets": budgets,
            "seed": seed,
            "out": out,
        }
        subprocess.run(
            [python, "-m", "sae_core.bench.sparsify_peer", json.dumps(args)],
            cwd=repo,
            check=True,
            env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
        )
        log = json.loads((Path(out) / "log.json").read_text())
        points = []
        for entry in log["snapshots"]:
            weights = load_file(str(Path(out) / entry["file"]))
            reconstruct = sparsify_reconstruct(weights, k)
            fvu = scorer.fvu(reconstruct)
            points.append(
                RecipePoint(
                    trainer="sparsify",
                    budget=entry["budget"],
                    tokens=entry["tokens"],
                    steps=entry["steps"],
                    batch_size=batch_size,
                    peak_lr=log["lr"],
                    fvu=fvu,
                    nmse=fvu,
                    ce_loss_recovered=scorer.ce_loss_recovered(reconstruct),
                    dead_fraction=entry["dead_fraction"],
                    train_seconds=entry["seconds"],
                    nmse_per_token=scorer.nmse_per_token(reconstruct),
                )
            )
    return points


def recipe_study(
    acts: DatasetRef,
    model: torch.nn.Module,
    sae_cfg: SAEConfig,
    train_cfg: TrainConfig,
    budgets: list[int],
    recipes: list[str],
    out: Path,
    sparsify_python: str | None = None,
    ce_contexts: int = 128,
) -> list[RecipePoint]:
    """The study on `acts` (`model`: the float32 LM it came from, for CE loss recovered):
    sae_cfg trained with train_cfg under each recipe at each budget, then sparsify when
    `sparsify_python` is given. Each point is written to `out` (JSON) as it finishes, and a
    point already there is not trained again."""
    scorer = Scorer(acts, model, ce_contexts)
    points = [RecipePoint(**p) for p in json.loads(out.read_text())] if out.exists() else []

    def save() -> None:
        out.write_text(json.dumps([p._asdict() for p in points], indent=1) + "\n")

    done = {(p.trainer, p.budget) for p in points}
    for budget in budgets:
        for recipe in recipes:
            if (recipe, budget) in done:
                continue
            cfg = train_cfg.model_copy(update={"recipe": recipe, "tokens": budget})
            points.append(train_recipe(acts, sae_cfg, cfg, scorer))
            save()
    todo = [b for b in budgets if ("sparsify", b) not in done]
    if sparsify_python and todo:
        points += run_sparsify(
            sparsify_python,
            acts,
            sae_cfg.n_latents,
            sae_cfg.k,
            train_cfg.batch_size,
            todo,
            train_cfg.seed,
            scorer,
        )
        save()
    return points
