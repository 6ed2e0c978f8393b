"""Transcoders and skip transcoders: the sparse loss against the dense reference, an exact skip
transcoder, training on (x, y) pairs, and the files and checkpoints that keep both sides'
normalisation."""

from __future__ import annotations

import pytest
import torch

from sae_core.config import SAEConfig, TrainConfig, build_config, load_config
from sae_core.errors import ConfigError
from sae_core.sae import SkipTranscoderSAE, TranscoderSAE, build_sae, load_sae_bytes
from sae_core.training.trainer import Trainer, init_sae

D, N = 16, 64


def _pairs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, D] and y = a sparse nonlinear function of x plus a linear part: [n, D] each."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    A = torch.randn(D, D, generator=g) / D**0.5
    features = torch.randn(8, D, generator=g)
    y = x @ A.T + torch.relu(x @ torch.randn(D, 8, generator=g) - 1) @ features
    return x, y


def _cfg(kind: str, **kw) -> SAEConfig:
    return SAEConfig(kind=kind, n_latents=N, k=4, normalize="global", k_aux=6, **kw)


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
@pytest.mark.parametrize("extra", [{}, {"multi_topk": True}, {"batch_topk": True}])
def test_sparse_loss_and_gradients_equal_the_dense_reference(kind, extra):
    x, y = _pairs(128)
    sae = init_sae(D, _cfg(kind, **extra), torch.cat([x, y], 1), seed=1)
    if sae.SKIP:
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.1)  # zero at init: make its gradient path visible
    xn, yn = sae.norm.apply(x)[0], sae.out_norm.apply(y)[0]
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    results = []
    for dense in (False, True):
        sae.zero_grad()
        out = sae(xn, dead, dense=dense, target=yn)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (sparse, g_sparse), (ref, g_ref) = results
    assert sparse.aux_loss > 0 and torch.equal(sparse.latent_idx, ref.latent_idx)
    torch.testing.assert_close(sparse.loss, ref.loss)
    assert g_sparse.keys() == g_ref.keys() and ("W_skip" in g_ref) == (kind == "skip_transcoder")
    for name in g_ref:
        torch.testing.assert_close(g_sparse[name], g_ref[name], rtol=1e-4, atol=1e-5)


def test_the_loss_is_the_nmse_of_y():
    """No latent firing and b_dec at y's mean: the prediction is the mean of y, NMSE 1."""
    x, y = _pairs(256)
    sae = init_sae(D, _cfg("transcoder"), torch.cat([x, y], 1), seed=0)
    xn, yn = sae.norm.apply(x)[0], sae.out_norm.apply(y)[0]
    with torch.no_grad():
        sae.b_enc.fill_(-1e4)
        sae.b_dec.copy_(yn.mean(0))
    torch.testing.assert_close(sae(xn, target=yn).nmse, torch.tensor(1.0))


def test_an_exact_skip_transcoder_reproduces_a_linear_map():
    """W_skip equal to a linear 'MLP' and no latent firing: the output is exact."""
    g = torch.Generator().manual_seed(0)
    A, c = torch.randn(D, D, generator=g), torch.randn(D, generator=g)
    x = torch.randn(200, D, generator=g)
    tc = build_sae(D, SAEConfig(kind="skip_transcoder", n_latents=N, k=4, normalize="none"))
    with torch.no_grad():
        tc.W_skip.copy_(A)
        tc.b_dec.copy_(c)
        tc.b_enc.fill_(-1e4)
    torch.testing.assert_close(tc.reconstruct(x), x @ A.T + c, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_training_on_pairs_lowers_the_loss_on_y(kind):
    x, y = _pairs(4096)
    batches = torch.cat([x, y], 1)
    trainer = Trainer(
        init_sae(D, _cfg(kind), batches[:1024], seed=0),
        TrainConfig(batch_size=256, lr=1e-2, recipe="paper"),
    )
    history = [trainer.step(batches[i : i + 256]) for _ in range(8) for i in range(0, 4096, 256)]
    first, last = history[0]["nmse"], history[-1]["nmse"]
    assert last < 0.5 * first, (first, last)
    y_hat = trainer.sae.reconstruct(x)
    nmse = float((y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert nmse < 0.5
    if kind == "skip_transcoder":
        assert trainer.sae.W_skip.abs().max() > 0.05  # the skip path learned the linear part


def test_file_and_checkpoint_keep_the_output_normalisation():
    x, y = _pairs(512)
    trainer = Trainer(
        init_sae(D, _cfg("skip_transcoder"), torch.cat([x, y * 40], 1), seed=0),
        TrainConfig(batch_size=128),
    )
    trainer.step(torch.cat([x, y * 40], 1)[:128])
    sae = trainer.sae
    assert sae.out_norm.global_scale != sae.norm.global_scale
    back = load_sae_bytes(sae.to_bytes())
    assert isinstance(back, SkipTranscoderSAE) and back.out_norm == sae.out_norm
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x))
    resumed = Trainer.from_checkpoint(trainer.checkpoint_bytes(), trainer.cfg)
    assert resumed.sae.out_norm == sae.out_norm
    torch.testing.assert_close(resumed.sae.reconstruct(x), sae.reconstruct(x))


def test_batch_of_the_wrong_width_is_refused():
    tc = build_sae(D, _cfg("transcoder"))
    assert isinstance(tc, TranscoderSAE) and not tc.SKIP
    with pytest.raises(ValueError, match=r"\[B, 32\]"):
        tc.split_batch(torch.zeros(4, D))


# A valid transcoder's settings but for the one a case adds.
_TRANSCODER = [
    "sae.kind=transcoder",
    "sae.normalize=global",
    "model.hook=mlp_in.1",
    "model.hook_out=mlp_out.1",
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["sae.kind=transcoder", "sae.normalize=per_token"], "sae.normalize=global or none"),
        (["sae.kind=transcoder", "sae.normalize=global"], "needs model.hook_out"),
        (["model.hook_out=mlp_out.1"], "model.hook_out is for transcoders"),
        (
            ["sae.kind=transcoder", "sae.normalize=global", "model.hook=mlp_out.1",
             "model.hook_out=mlp_out.1"],
            "equals model.hook",
        ),
        (
            ["sae.kind=skip_transcoder", "sae.normalize=global", "model.hook_out=mlp_out.1",
             "data.max_norm=100"],
            "unpair",
        ),
        (["sae.kind=transcoder", "sae.degree=4", "sae.normalize=global"], "does not use sae.degree"),
        ([*_TRANSCODER, "model.compile=true"], "set model.compile=false"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config({}, overrides)


def test_the_tiny_transcoder_preset_is_valid():
    config = load_config("tiny-transcoder")
    assert (config.model.hook, config.model.hook_out, config.sae.kind) == (
        "mlp_in.3",
        "mlp_out.3",
        "skip_transcoder",
    )
    assert config.saebench.enabled  # scored on its task (sae_core.stages.saebench)
