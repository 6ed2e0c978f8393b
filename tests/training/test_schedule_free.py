"""Schedule-free Adam: its three sequences against a hand-written reference, the constraint on z,
the trainer shipping the average with a unit-norm decoder. (Exact resume under it:
tests/training/test_trainer.py and test_group.py, whose runs use the budget recipe.)"""

from __future__ import annotations

import torch

from sae_core.config import SAEConfig, TrainConfig
from sae_core.sae.topk import TopKSAE
from sae_core.training.group import run_training, tensor_source
from sae_core.training.schedule_free import INTERPOLATION, ScheduleFreeAdam
from tests.helpers.activations import sparse_dictionary_data


def _reference(y0: torch.Tensor, grads: list[torch.Tensor], rates: list[float], eps: float):
    """z: Adam-normalised steps without a first moment; x: the lr^2-weighted mean of z_1..z_t;
    y = lerp(z, x, beta)."""
    z, x, v, weights = y0.clone(), y0.clone(), torch.zeros_like(y0), 0.0
    ys = []
    for t, (g, lr) in enumerate(zip(grads, rates, strict=True), start=1):
        v = 0.999 * v + 0.001 * g * g
        z = z - lr * g / ((v / (1 - 0.999**t)).sqrt() + eps)
        weights += lr * lr
        x = x + (lr * lr / weights) * (z - x)
        ys.append((1 - INTERPOLATION) * z + INTERPOLATION * x)
    return z, x, ys


def test_the_three_sequences_follow_the_definition():
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=gen))
    y0 = p.detach().clone()
    grads = [torch.randn(5, 3, generator=gen) for _ in range(6)]
    rates = [0.01, 0.02, 0.03, 0.03, 0.03, 0.03]  # a warm-up, then held
    opt = ScheduleFreeAdam([p], lr=rates[0], eps=1e-8)
    for g, lr in zip(grads, rates, strict=True):
        opt.param_groups[0]["lr"] = lr
        p.grad = g
        opt.step()
    z, x, ys = _reference(y0, grads, rates, 1e-8)
    torch.testing.assert_close(opt.state[p]["z"], z)
    torch.testing.assert_close(opt.state[p]["x"], x)
    torch.testing.assert_close(p.detach(), ys[-1])
    torch.testing.assert_close(opt.averaged()[p], x)


def test_the_constraint_applies_to_z_and_the_average_follows_it():
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    opt = ScheduleFreeAdam([p], lr=0.1)
    seen = []

    def unit_rows() -> None:
        seen.append(p.detach().clone())  # the parameter holds z while the constraint runs
        with torch.no_grad():
            p.div_(p.norm(dim=1, keepdim=True))

    p.grad = torch.ones_like(p)
    opt.step(constrain=unit_rows)
    z = opt.state[p]["z"]
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(seen[0] / seen[0].norm(dim=1, keepdim=True), z)
    torch.testing.assert_close(opt.state[p]["x"], z)  # the first step's weight is 1
    torch.testing.assert_close(p.detach(), z)  # y = lerp(z, x) with x = z


def test_unit_decoder_keeping_codes_keeps_the_reconstruction():
    sae = TopKSAE(16, SAEConfig(n_latents=32, k=4))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 1.0, 32)[:, None])  # shortened, unequally
        sae.b_enc.uniform_(-0.1, 0.1)
    before = sae.reconstruct(x)
    codes = sae.encode(x)
    sae.unit_decoder_keeping_codes_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    after_codes = sae.encode(x)
    same = (codes.idx.sort(dim=1).values == after_codes.idx.sort(dim=1).values).all(dim=1)
    assert same.any()
    torch.testing.assert_close(sae.reconstruct(x)[same], before[same], rtol=1e-5, atol=1e-5)


def _train(x: torch.Tensor, steps: int):
    cfg = TrainConfig(batch_size=128, tokens=128 * steps, checkpoint_every_tokens=10**9)
    return run_training(
        32,
        SAEConfig(n_latents=64, k=3, dead_window_tokens=512),
        cfg,
        tensor_source(x, 128, 0),
        len(x) // 128,
        lambda: x[:512],
        progress=False,
    )


def test_the_budget_recipe_ships_the_average_with_a_unit_norm_decoder():
    x, _ = sparse_dictionary_data(2048)
    trainer = _train(x, 12)
    assert isinstance(trainer.opt, ScheduleFreeAdam)
    shipped = trainer.final_sae()
    torch.testing.assert_close(shipped.W_dec.norm(dim=1), torch.ones(64))
    assert not torch.equal(shipped.W_enc, trainer.sae.W_enc)  # the average, not y
    loss = [r["nmse"] for r in trainer.state.history]
    assert loss[-1] < 0.75 * loss[0]
