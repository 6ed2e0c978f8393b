"""Schedule-free Adam (Defazio et al. 2024, "The Road Less Scheduled"): the budget recipe's
optimiser.

Three sequences per parameter: z takes Adam-normalised gradient steps (no first moment), x is a
running average of z weighted by each step's squared rate, and the gradient is taken at
y = lerp(z, x, INTERPOLATION), which the parameters hold while training. x is the model to
ship: the average does what a decaying rate does, without knowing the run's length, and the
rate can stay high throughout. Measured at 64 steps: docs/results/recipes/README.md.

A constraint on the weights (the unit-norm decoder) applies to z after each step: `step` swaps
z into the parameters, calls `constrain`, and swaps back.

State per parameter, as a checkpoint keeps it: `z`, `x`, `exp_avg_sq` [same shape], `step` and
`weight_sum` (the sum of squared rates so far) [scalars].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

INTERPOLATION = 0.9  # beta: y = (1 - beta) z + beta x


class ScheduleFreeAdam(torch.optim.Optimizer):
    """Cost per step: about six elementwise passes over the parameters; memory: three copies."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        beta2: float = 0.999,
        eps: float = 1e-8,
        interpolation: float = INTERPOLATION,
    ):
        defaults = {"lr": lr, "beta2": beta2, "eps": eps, "interpolation": interpolation}
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["weight_sum"] = torch.zeros((), dtype=torch.float32)  # as a checkpoint reloads it
            state["z"] = p.detach().clone()
            state["x"] = p.detach().clone()
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, constrain: Callable[[], None] | None = None) -> None:  # type: ignore[override]
        """One step from the gradients at y; `constrain()` is applied to z (held by the
        parameters while it runs). Parameters without a gradient keep their sequences."""
        stepped: list[tuple[torch.nn.Parameter, dict[str, torch.Tensor], dict]] = []
        for group in self.param_groups:
            lr, beta2, eps = group["lr"], group["beta2"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                state["weight_sum"] += lr * lr
                v = state["exp_avg_sq"]
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                bias2 = 1 - beta2 ** float(state["step"])
                denom = (v / bias2).sqrt_().add_(eps)
                state["z"].addcdiv_(p.grad, denom, value=-lr)
                # The parameter now holds z; its y buffer is reused below.
                p.data, state["z"] = state["z"], p.data
                stepped.append((p, state, group))
        if constrain is not None:
            constrain()
        for p, state, group in stepped:
            lr = group["lr"]
            z, y = p.data, state["z"]
            weight = lr * lr / float(state["weight_sum"]) if float(state["weight_sum"]) else 1.0
            state["x"].lerp_(z, weight)
            torch.lerp(z, state["x"], group["interpolation"], out=y)
            state["z"], p.data = z, y

    def averaged(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """x for every parameter that has stepped: the weights to ship."""
        return {
            p: self.state[p]["x"]
            for group in self.param_groups
            for p in group["params"]
            if self.state.get(p)
        }

    @torch.no_grad()
    def reset_rows_(self, p: torch.nn.Parameter, rows: torch.Tensor) -> None:
        """Restart `rows` of p (re-initialised in place): z and x take their new values, their
        second moments restart."""
        state = self.state.get(p)
        if state:
            state["z"][rows] = p[rows]
            state["x"][rows] = p[rows]
            state["exp_avg_sq"][rows] = 0.0
