"""Every evaluation metric, defined once, as streaming accumulators over batches.

Conventions (the same for every flow):
- Reconstruction metrics are computed on raw activations (the SAE's normalisation is undone),
  over the tokens the SAE was trained on (position 0 excluded when the data config skips it).
- Downstream metrics compare next-token cross-entropy with the hook output replaced at those
  same positions; predictions made from an excluded position are left out of every variant, so
  the baselines see exactly the positions the SAE touches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def normalized_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """MSE(x, x_hat) / MSE(x, mean(x)) over a batch. x, x_hat: [N, d]."""
    err = (x - x_hat).pow(2).sum()
    base = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return float(err / base)


@dataclass
class ReconstructionStats:
    """Accumulates normalised MSE, L0 and latent firing counts over many batches."""

    n_latents: int
    tokens: int = 0
    sq_err: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_sq_x: float = 0.0
    active_total: int = 0
    fire_counts: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.fire_counts = torch.zeros(self.n_latents, dtype=torch.long)

    def update(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        latent_idx: torch.Tensor,
        latent_vals: torch.Tensor,
    ) -> None:
        """x, x_hat: [N, d] raw; latent_idx, latent_vals: [N, k] (a latent fires when its value > 0)."""
        x = x.double()
        self.tokens += x.shape[0]
        self.sq_err += float((x - x_hat.double()).pow(2).sum())
        s = x.sum(dim=0).cpu()
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq_x += float(x.pow(2).sum())
        fired = latent_vals > 0
        self.active_total += int(fired.sum())
        self.fire_counts += torch.bincount(
            latent_idx[fired].flatten().cpu(), minlength=self.n_latents
        )

    def result(self) -> dict[str, float]:
        if self.tokens == 0:
            raise ValueError("no tokens were evaluated")
        # Variance around the mean, from running sums: sum||x||^2 - N ||mean||^2.
        mean_sq = float(self.sum_x.pow(2).sum()) / self.tokens
        variance = self.sum_sq_x - mean_sq
        return {
            "nmse": self.sq_err / variance,
            "l0": self.active_total / self.tokens,
            "dead_fraction": float((self.fire_counts == 0).float().mean()),
            "eval_tokens": float(self.tokens),
        }


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Summed next-token cross-entropy of predictions made from positions >= first.

    logits: [B, T, V]; input_ids: [B, T]. Returns a 0-d tensor: the sum over B * (T - 1 - first) terms.
    """
    pred = logits[:, first:-1].float()
    target = input_ids[:, first + 1 :]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")


@dataclass
class DownstreamStats:
    """Sums of next-token CE for the clean model and each variant with the hook output replaced."""

    terms: int = 0
    ce_sums: dict[str, float] = field(default_factory=dict)

    def update(self, variant: str, ce_sum: torch.Tensor, terms: int) -> None:
        self.ce_sums[variant] = self.ce_sums.get(variant, 0.0) + float(ce_sum)
        if variant == "clean":
            self.terms += terms

    def result(self) -> dict[str, float]:
        ce = {name: total / self.terms for name, total in self.ce_sums.items()}
        out = {f"ce_{name}": value for name, value in ce.items()}
        if "spliced" in ce:
            out["delta_lm_loss"] = ce["spliced"] - ce["clean"]
            if "zero" in ce:
                out["ce_loss_recovered"] = ce_loss_recovered(ce["clean"], ce["spliced"], ce["zero"])
        return out


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """(CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 is perfect, 0 is no better than ablation."""
    gap = ce_ablated - ce_clean
    if gap <= 0:
        return float("nan")
    return (ce_ablated - ce_spliced) / gap
