"""Expander SAEs: the graph's invariants, the compact decoder and tied encoder against a dense
masked reference, the unit-norm constraint, I/O, training, resampling, exact resume and OMP."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_tensors

from sae_core.config import SAEConfig, TrainConfig
from sae_core.errors import ConfigError
from sae_core.sae import (
    ExpanderSAE,
    TopKSAE,
    build_sae,
    load_sae_bytes,
    storage_report,
)
from sae_core.sae.expander import expander_mask
from sae_core.sae.normalize import InputNorm
from sae_core.sae.safetensors_io import safetensors_metadata
from sae_core.storage.store import Store
from sae_core.training.group import run_training, tensor_source
from sae_core.training.trainer import Trainer, init_sae

D, N, K, DEGREE = 24, 96, 4, 5


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> SAEConfig:
    return SAEConfig(**({"kind": "expander", "n_latents": N, "k": K, "degree": DEGREE} | kw))


def _sae(encoder: str = "untied", normalize: str = "per_token", **kw) -> ExpanderSAE:
    cfg = _cfg(encoder=encoder, normalize=normalize, **kw)
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(1)) * 3 + 1
    sae = build_sae(D, cfg, InputNorm.fit(normalize, x), torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return sae


def _dense_masked(rows: torch.Tensor, values: torch.Tensor, m: int) -> torch.Tensor:
    """The dense [n, m] decoder from the compact layout, by plain indexing (differentiable)."""
    n = rows.shape[0]
    D_ = torch.zeros(n, m, dtype=values.dtype)
    return D_.index_put((torch.arange(n)[:, None].expand_as(rows), rows.long()), values)


def planted_data(n_tokens: int, d: int = 32, n_features: int = 64, seed: int = 1) -> torch.Tensor:
    """Sums of 3 of `n_features` unit features with coefficients in [0.1, 1]; feature j lives
    on row j of the expander graph expander_mask(n_features, d, 8, seed=0), so an SAE with that
    graph (n_latents = n_features, degree 8, mask_seed 0) can represent them exactly."""
    g = torch.Generator().manual_seed(seed)
    support = expander_mask(n_features, d, 8, seed=0).long()
    features = torch.zeros(n_features, d).scatter(
        1, support, torch.randn(n_features, 8, generator=g)
    )
    features /= features.norm(dim=1, keepdim=True)
    which = torch.rand(n_tokens, n_features, generator=g).argsort(dim=1)[:, :3]
    coef = torch.rand(n_tokens, 3, generator=g) * 0.9 + 0.1
    return (coef[..., None] * features[which]).sum(dim=1)


# The graph -------------------------------------------------------------------------------------
def test_mask_has_degree_distinct_rows_per_latent_and_covers_every_coordinate():
    rows = expander_mask(200, 40, 3, seed=0)
    assert rows.dtype == torch.int32 and rows.shape == (200, 3)
    assert (rows.diff(dim=1) > 0).all()  # ascending, hence distinct within a latent
    assert rows.min() >= 0 and rows.max() < 40
    assert torch.bincount(rows.reshape(-1).long(), minlength=40).min() > 0
    assert torch.equal(rows, expander_mask(200, 40, 3, seed=0))
    assert not torch.equal(rows, expander_mask(200, 40, 3, seed=1))


def test_mask_coordinates_are_uniform():
    counts = torch.bincount(expander_mask(4000, 20, 5, seed=3).reshape(-1).long(), minlength=20)
    assert (counts - 1000).abs().max() < 150  # 1000 expected per coordinate, sd ~ 27


def test_mask_repairs_an_exact_cover():
    # degree * n == m: a valid mask uses every coordinate exactly once; a plain draw almost
    # never does, so the repair is what makes it valid.
    rows = expander_mask(20, 40, 2, seed=0)
    assert torch.equal(torch.bincount(rows.reshape(-1).long(), minlength=40), torch.ones(40).long())
    assert (rows.diff(dim=1) > 0).all()


def test_impossible_masks_are_clear_errors():
    with pytest.raises(ConfigError, match=r"sae.degree=3 x sae.n_latents=10 .* at least 4 or"):
        expander_mask(10, 40, 3, seed=0)
    with pytest.raises(ConfigError, match="sae.degree=25 exceeds the model width 24"):
        ExpanderSAE(D, _cfg(degree=25))


def test_config_requires_degree_and_keeps_expander_fields_off_topk():
    with pytest.raises(ValueError, match="sae.kind=expander needs sae.degree"):
        SAEConfig(kind="expander")
    with pytest.raises(
        ValueError,
        match=r"does not use sae.degree, sae.encoder; remove it or set sae.kind=expander",
    ):
        SAEConfig(degree=4, encoder="tied")
    with pytest.raises(ConfigError, match="sae.kind=topk"):
        TopKSAE(D, _cfg())


# The compact decoder and encoder ---------------------------------------------------------------
def test_compact_decode_equals_the_dense_masked_decode():
    sae = _sae()
    dense = _dense_masked(sae.rows, sae.values.detach(), D)
    torch.testing.assert_close(sae.dense_decoder().detach(), dense)
    assert int((dense != 0).sum(dim=1).max()) == DEGREE
    g = torch.Generator().manual_seed(4)
    idx = torch.rand(16, N, generator=g).topk(K, dim=1).indices
    vals = torch.rand(16, K, generator=g)
    b_pre = sae.b_pre.detach().clone()
    expected = torch.zeros(16, N).scatter(1, idx, vals) @ dense + b_pre
    with torch.no_grad():
        torch.testing.assert_close(sae.sparse_decode(idx, vals, sae.b_pre), expected)
        # One token: [1, m] views of the bias are contiguous; the decoder must still copy it.
        torch.testing.assert_close(sae.sparse_decode(idx[:1], vals[:1], sae.b_pre), expected[:1])
    assert torch.equal(sae.b_pre, b_pre)


def _reference_loss(sae: ExpanderSAE, x: torch.Tensor, sel, params: dict[str, torch.Tensor]):
    """The loss of given selections with plain dense torch ops on the dense masked decoder."""
    D_ = _dense_masked(sae.rows, params["values"], sae.d)
    E = params.get("W_enc", D_)
    pre = (x - params["b_pre"]) @ E.t() + params["b_enc"]

    def decode(idx, acts, bias):
        return torch.zeros(x.shape[0], sae.n_latents).scatter(1, idx, acts) @ D_ + bias

    def nmse(target, recon):
        return ((recon - target) ** 2).sum() / ((target - target.mean(dim=0)) ** 2).sum()

    recon = decode(sel.idx, F.relu(pre.gather(1, sel.idx)), params["b_pre"])
    aux = decode(sel.aux_idx, F.relu(pre.gather(1, sel.aux_idx)), torch.zeros(sae.d))
    return nmse(x, recon) + sae.cfg.aux_alpha * nmse((x - recon).detach(), aux)


@pytest.mark.parametrize("encoder", ["untied", "tied"])
def test_gradients_equal_a_dense_masked_reference(encoder):
    sae = _sae(encoder, k_aux=6)
    x, _ = sae.norm.apply(torch.randn(32, D, generator=torch.Generator().manual_seed(5)))
    dead = torch.zeros(N, dtype=torch.bool)
    dead[::3] = True
    sel = sae.select(sae.preacts(x), dead)
    assert sel.aux_idx.shape == (32, 6)
    out = sae.losses(x, sel)
    out.loss.backward()
    params = {name: p.detach().clone().requires_grad_() for name, p in sae.named_parameters()}
    reference = _reference_loss(sae, x, sel, params)
    reference.backward()
    torch.testing.assert_close(out.loss, reference, rtol=1e-5, atol=1e-6)
    assert set(params) == {"values", "b_enc", "b_pre"} | (
        {"W_enc"} if encoder == "untied" else set()
    )
    for name, p in sae.named_parameters():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("extra", ["multi_topk", "batch_topk"])
def test_multi_and_batch_topk_sparse_path_equals_dense_path(extra):
    sae = _sae("tied", **{extra: True})
    x, _ = sae.norm.apply(torch.randn(32, D, generator=torch.Generator().manual_seed(6)))
    sel = sae.select(sae.preacts(x))
    grads = []
    for dense in (False, True):
        sae.zero_grad()
        out = sae.losses(x, sel, dense=dense)
        out.loss.backward()
        grads.append((out.loss.detach(), sae.values.grad.clone(), sae.b_pre.grad.clone()))
    for sparse, dense in zip(*grads, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-6)


def test_projected_gradient_is_orthogonal_and_step_keeps_unit_norm():
    sae = _sae("tied")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x, _ = sae.norm.apply(torch.randn(64, D, generator=torch.Generator().manual_seed(7)))
    sae(x).loss.backward()
    raw_parallel = (sae.values.grad * sae.values).sum(dim=1).abs().max()
    sae.project_decoder_grad()
    parallel = (sae.values.grad * sae.values).sum(dim=1).abs().max()
    assert raw_parallel > 1e-4 and parallel < 1e-7
    opt.step()
    assert (sae.values.norm(dim=1) - 1).abs().max() > 1e-5  # the step alone leaves the sphere
    sae.normalize_decoder()
    torch.testing.assert_close(sae.dense_decoder().norm(dim=1), torch.ones(N))


@pytest.mark.parametrize("encoder", ["untied", "tied"])
def test_parameter_count_is_degree_n_plus_biases_plus_untied_encoder(encoder):
    sae = _sae(encoder)
    count = sum(p.numel() for p in sae.parameters())
    encoder_count = N * D if encoder == "untied" else 0
    assert count == DEGREE * N + N + D + encoder_count
    assert sae.values.shape == (N, DEGREE) and sae.rows.dtype == torch.int32
    assert not any(p.numel() == N * D for name, p in sae.named_parameters() if name != "W_enc")
    if encoder == "untied":  # tied at initialisation
        torch.testing.assert_close(sae.W_enc.detach(), sae.dense_decoder().detach())


def test_tied_encoder_is_the_masked_decoder_after_a_step():
    sae = _sae("tied", normalize="none")
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(8))
    trainer = Trainer(sae, TrainConfig(batch_size=64, lr=1e-2))
    before = sae.values.detach().clone()
    trainer.step(x)
    assert not torch.equal(before, sae.values) and sae.W_enc is None
    assert "W_enc" not in sae.state_dict()
    dense = _dense_masked(sae.rows, sae.values.detach(), D)
    with torch.no_grad():
        expected = (x - sae.b_pre) @ dense.t() + sae.b_enc
        torch.testing.assert_close(sae.preacts(x), expected, rtol=1e-5, atol=1e-5)
        codes = sae.encode(x)
        torch.testing.assert_close(codes.vals, torch.relu(expected.gather(1, codes.idx)))


# I/O ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoder", ["untied", "tied"])
def test_safetensors_round_trip_and_dispatch(tmp_path, encoder):
    sae = _sae(encoder, "global", mask_seed=3)
    path = tmp_path / "sae.safetensors"
    sae.save_safetensors(path)
    data = path.read_bytes()
    meta = safetensors_metadata(data)
    assert meta["format"] == "saeflow.expander" and '"degree":5' in meta["config"]
    tensors = load_tensors(data)
    expected = {"rows", "values", "b_enc", "b_pre"} | ({"W_enc"} if encoder == "untied" else set())
    assert set(tensors) == expected and tensors["rows"].dtype == torch.int32
    x = torch.randn(6, D)
    for loaded in (
        load_sae_bytes(data),
        ExpanderSAE.load_safetensors(io.BytesIO(data)),
        ExpanderSAE.load_safetensors(path),
    ):
        assert isinstance(loaded, ExpanderSAE) and loaded.cfg == sae.cfg
        assert torch.equal(loaded.rows, sae.rows) and loaded.norm == sae.norm
        torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))
    with pytest.raises(ConfigError, match="not a saeflow TopKSAE file"):
        TopKSAE.from_bytes(data)
    topk = TopKSAE(D, SAEConfig(n_latents=N, k=K))
    assert isinstance(load_sae_bytes(topk.to_bytes()), TopKSAE)


def test_storage_report_against_the_dense_equivalent():
    tied, untied = _sae("tied"), _sae("untied")
    report = storage_report(tied)
    assert report["decoder_values"] == N * DEGREE and report["dense_decoder_values"] == N * D
    assert report["compression"] == D / DEGREE
    assert report["artifact_bytes"] == len(tied.to_bytes())
    dense = TopKSAE(D, SAEConfig(n_latents=N, k=K), tied.norm)
    dense_bytes = len(dense.to_bytes())
    assert abs(report["dense_artifact_bytes"] - dense_bytes) < 100  # header names and shapes
    assert report["artifact_bytes"] < dense_bytes / 2
    assert storage_report(untied)["artifact_bytes"] > report["artifact_bytes"] + N * D * 4 - 1
    assert storage_report(dense)["dense_artifact_bytes"] == dense_bytes


# Training ----------------------------------------------------------------------------------------
def _train(x: torch.Tensor, epochs: int = 4, **sae) -> Trainer:
    cfg = SAEConfig(**({"n_latents": 64, "k": 3, "normalize": "none"} | sae))
    # A constant rate (the paper's schedule): these tests compare trajectories, not recipes.
    train_cfg = TrainConfig(batch_size=128, epochs=epochs, lr=1e-2, recipe="paper")
    source = tensor_source(x, 128, 0)
    return run_training(32, cfg, train_cfg, source, len(x) // 128, lambda: x[:1024], progress=False)


@pytest.mark.parametrize("encoder", ["untied", "tied"])
def test_training_on_a_planted_sparse_dictionary_lowers_the_nmse(encoder):
    trainer = _train(planted_data(4096), kind="expander", degree=8, encoder=encoder)
    nmse = [r["nmse"] for r in trainer.state.history]
    print(f"{encoder}: nmse {nmse[0]:.3f} -> {nmse[-1]:.3f}")
    assert nmse[-1] < 0.6 * nmse[0]
    torch.testing.assert_close(trainer.sae.values.norm(dim=1), torch.ones(64))


def test_full_degree_untied_expander_trains_like_topk():
    # degree = d: every latent's support is all of [0, d), so the same seed draws TopK's
    # weights and the two kinds' different kernels must follow the same trajectory.
    x = planted_data(2048)
    topk = _train(x, epochs=2)
    full = _train(x, epochs=2, kind="expander", degree=32)
    curve = [r["nmse"] for r in topk.state.history]
    assert curve[-1] < 0.7 * curve[0]
    assert [r["nmse"] for r in full.state.history] == pytest.approx(curve, rel=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(full.sae.dense_decoder(), topk.sae.W_dec, atol=1e-4, rtol=0)


def test_resampling_reinitialises_dead_latents_inside_their_support():
    x = planted_data(1024)
    cfg = SAEConfig(
        kind="expander", n_latents=64, k=3, degree=8, dead_window_tokens=256, resample_dead=True
    )
    sae = init_sae(32, cfg, x, seed=0)
    with torch.no_grad():
        sae.b_enc[:16] = -100.0  # never above zero: dead after the first window
    trainer = Trainer(sae, TrainConfig(batch_size=128, lr=3e-3))
    trainer.step(x[:128])
    assert trainer.state.history[-1]["resampled"] == 0
    before = sae.values.detach().clone()
    trainer.step(x[128:256])  # 256 tokens: the window's boundary
    resampled = trainer.state.history[-1]["resampled"]
    assert resampled >= 16 and (sae.b_enc[:16] == 0).all()
    assert not torch.isclose(before[:16], sae.values[:16]).any()
    torch.testing.assert_close(sae.values.norm(dim=1), torch.ones(64))
    assert (trainer.dead.since[:16] == 0).all()
    for name in ("values", "W_enc", "b_enc"):
        state = trainer.opt.state[dict(sae.named_parameters())[name]]
        assert (state["exp_avg"][:16] == 0).all() and (state["exp_avg_sq"][:16] == 0).all()
    with torch.no_grad():  # the untied encoder row is tied again, as at init
        torch.testing.assert_close(sae.W_enc[:16], sae.dense_decoder()[:16])


def _run(store, x, encoder, stop=None):
    cfg = SAEConfig(
        kind="expander",
        n_latents=128,
        k=2,
        degree=6,
        encoder=encoder,
        dead_window_tokens=256,
        resample_dead=True,
    )
    train_cfg = TrainConfig(
        batch_size=128,
        epochs=2,
        lr=3e-3,
        checkpoint_every_tokens=1024,
        ema_decay=0.9,
        recipe="paper",
    )
    return run_training(
        32,
        cfg,
        train_cfg,
        tensor_source(x, 128, 0),
        len(x) // 128,
        lambda: x[:1024],
        store=store,
        checkpoint_dir="ckpt",
        progress=False,
        stop_after_steps=stop,
    )


@pytest.mark.parametrize("encoder", ["untied", "tied"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, encoder):
    x = planted_data(2048)
    full = _run(None, x, encoder)
    assert sum(r["resampled"] for r in full.state.history) > 0  # resampling is exercised
    store = Store(str(tmp_path / "store"))
    first = _run(store, x, encoder, stop=21)  # after the checkpoint at step 16 (2048 tokens)
    assert first.state.step == 21
    torch.manual_seed(12345)  # the restart must not depend on the process's RNG state
    resumed = _run(store, x, encoder)
    assert resumed.resumed_from_tokens == 2048 and resumed.state.step == 32
    assert torch.equal(full.sae.rows, resumed.sae.rows)
    for name, t in full.final_sae().state_dict().items():
        assert torch.equal(t, resumed.final_sae().state_dict()[name]), name
    for name, p in full.sae.named_parameters():
        assert torch.equal(p, dict(resumed.sae.named_parameters())[name]), name
    assert torch.equal(full.dead.since, resumed.dead.since)
    assert [r["loss"] for r in full.state.history] == [r["loss"] for r in resumed.state.history]


# OMP ---------------------------------------------------------------------------------------------
def test_omp_recovers_the_atoms_of_a_planted_signal():
    sae = _sae("tied", "none", degree=8)
    g = torch.Generator().manual_seed(9)
    atoms = torch.rand(32, N, generator=g).topk(3, dim=1).indices  # 3 distinct atoms per token
    coef = torch.rand(32, 3, generator=g) + 0.5
    with torch.no_grad():
        x_raw = sae.sparse_decode(atoms, coef, sae.b_pre)
    codes = sae.omp_encode(x_raw, k=3)
    assert torch.equal(codes.idx.sort(dim=1).values, atoms.sort(dim=1).values)
    order = codes.idx.argsort(dim=1)
    torch.testing.assert_close(
        codes.vals.gather(1, order), coef.gather(1, atoms.argsort(dim=1)), rtol=1e-4, atol=1e-4
    )
    torch.testing.assert_close(sae.decode(*codes), x_raw, rtol=1e-4, atol=1e-4)
