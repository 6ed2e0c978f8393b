"""Training: the full train_sae path on a stored activations dataset, exact resume, recovery."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_tensors

from sae_core.config import SAEConfig, TrainConfig
from sae_core.errors import ConfigError
from sae_core.sae import kernels, load_sae, unit_adam
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store
from sae_core.training.group import CHECKPOINT_FILE, run_training, tensor_source
from sae_core.training.recipe import paper_lr
from sae_core.training.train import train_sae
from sae_core.training.trainer import DeadLatents, Trainer, init_sae
from tests.helpers.activations import sparse_dictionary_data, write_activations


@pytest.fixture(autouse=True)
def one_thread():
    """These SAEs are tiny: one thread is faster, and on a busy 2-core machine it is ~10x faster
    (every parallel region otherwise waits for a descheduled worker). Results are identical."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_paper_lr_follows_the_paper():
    assert paper_lr(2**14) == pytest.approx(2e-4)
    assert paper_lr(2**16) == pytest.approx(1e-4)


def test_train_sae_writes_weights_history_and_manifest(tmp_path):
    store = Store(str(tmp_path / "store"))
    x, _ = sparse_dictionary_data(4096)
    acts = write_activations(store, "activations/test", x * 5 + 2, x[:256])
    sae_cfg = SAEConfig(n_latents=96, k=3, dead_window_tokens=1024)
    train_cfg = TrainConfig(
        batch_size=256, epochs=2, lr=3e-3, device="cpu", checkpoint_every_tokens=2048
    )
    with store.writing("sae/test") as writer:
        result = train_sae(acts, sae_cfg, train_cfg, writer, "checkpoints/test", progress=False)
    manifest = store.manifest("sae/test")
    assert manifest["kind"] == "sae" and manifest["tokens_seen"] == 2 * 4096
    assert (manifest["d"], manifest["n"], manifest["k"]) == (32, 96, 3)
    assert manifest["normalization"]["mode"] == "per_token"
    # The recipe is recorded: the budget recipe's warm-up (5% of 32 steps), its rate held, and
    # its optimiser.
    assert (manifest["recipe"], manifest["lr"]) == ("budget", 3e-3)
    assert (manifest["lr_warmup_steps"], manifest["lr_decay"]) == (2, "none")
    assert manifest["optimizer"] == "schedule_free_adam"
    assert json.loads(store.read_bytes("sae/test/config.json"))["train"]["recipe"] == "budget"
    assert (manifest["device"], manifest["gemm_dtype"]) == ("cpu", "float32")
    assert 0 <= manifest["dead_fraction"] <= 1 and manifest["final_nmse"] < 0.8
    history = store.read_json("sae/test/history.json")
    assert len(history) == 32 and {"loss", "nmse", "dead_fraction", "l0", "aux_loss"} <= set(
        history[0]
    )
    assert history[-1]["nmse"] < history[0]["nmse"]
    assert json.loads(store.read_bytes("sae/test/config.json"))["sae"]["n_latents"] == 96
    assert store.exists(f"checkpoints/test/{CHECKPOINT_FILE}")
    loaded = load_sae(DatasetRef(store=store.uri, path="sae/test", fingerprint="test"))
    raw = x[:64] * 5 + 2
    torch.testing.assert_close(loaded.reconstruct(raw), result.sae.reconstruct(raw))
    assert result.resumed_from_tokens == 0


def test_train_sae_rejects_a_batch_larger_than_the_data(tmp_path):
    store = Store(str(tmp_path / "store"))
    x, _ = sparse_dictionary_data(100)
    acts = write_activations(store, "activations/small", x, x)
    with pytest.raises(ConfigError, match="train.batch_size"), store.writing("sae/x") as writer:
        train_sae(
            acts, SAEConfig(n_latents=8, k=2), TrainConfig(batch_size=256), writer, "checkpoints/x"
        )


def _run(store, x, stop=None, every=1024, epochs=2, extras=False):
    """extras: BatchTopK (its threshold is state) and a moving average of the weights."""
    sae_cfg = SAEConfig(n_latents=64, k=3, dead_window_tokens=512, batch_topk=extras)
    train_cfg = TrainConfig(
        batch_size=128,
        epochs=epochs,
        lr=3e-3,
        checkpoint_every_tokens=every,
        ema_decay=0.9 if extras else None,
        recipe="paper" if extras else "budget",
    )
    return run_training(
        32,
        sae_cfg,
        train_cfg,
        tensor_source(x, 128, 0),
        len(x) // 128,
        lambda: x[:1024],
        store=store,
        checkpoint_dir="ckpt",
        progress=False,
        stop_after_steps=stop,
    )


@pytest.mark.parametrize("extras", [False, True], ids=["topk", "batchtopk_ema"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, extras, capsys):
    x, _ = sparse_dictionary_data(2048)
    full = _run(None, x, extras=extras)
    store = Store(str(tmp_path / "store"))
    # Interrupted mid-epoch 1 (step 21), after the checkpoint at step 16 (2048 tokens).
    first = _run(store, x, stop=21, extras=extras)
    assert first.state.step == 21
    torch.manual_seed(12345)  # the restart must not depend on the process's RNG state
    capsys.readouterr()
    resumed = _run(store, x, extras=extras)
    assert resumed.resumed_from_tokens == 2048
    # Said when it happens (the flow's log_prints sends it to the run's log).
    assert "training resumes from ckpt/last.safetensors at 2048 tokens" in capsys.readouterr().out
    assert resumed.state.step == full.state.step == 32
    for name, t in full.final_sae().state_dict().items():
        assert torch.equal(t, resumed.final_sae().state_dict()[name]), name
    for name, p in full.sae.named_parameters():
        assert torch.equal(p, dict(resumed.sae.named_parameters())[name]), name
    assert torch.equal(full.dead.since, resumed.dead.since)
    assert [r["loss"] for r in full.state.history] == [r["loss"] for r in resumed.state.history]


def test_checkpoint_round_trip_restores_optimizer_and_counters():
    x, _ = sparse_dictionary_data(1024)
    t = _run(None, x, epochs=1)
    data = t.checkpoint_bytes()
    back = Trainer.from_checkpoint(data, t.cfg)
    for name, p in t.sae.named_parameters():
        i = list(dict(t.sae.named_parameters())).index(name)
        s0, s1 = t.opt.state[p], back.opt.state[list(back.sae.parameters())[i]]
        assert torch.equal(s0["exp_avg_sq"], s1["exp_avg_sq"]) and torch.equal(
            s0["step"], s1["step"]
        )
    assert back.state.step == t.state.step and back.state.history == t.state.history
    with pytest.raises(ConfigError, match="another train config"):
        Trainer.from_checkpoint(data, t.cfg.model_copy(update={"lr": 1.0}))


def test_fused_decoder_step_equals_project_adam_normalise(monkeypatch):
    """The TopK decoder's one-pass step (native kernels, no clipping) gives the weights and
    Adam state of the separate projection, torch Adam step and renormalisation."""
    if kernels.native.load() is None:
        pytest.skip("native kernels unavailable (no compiler)")
    x, _ = sparse_dictionary_data(512)
    cfg = SAEConfig(n_latents=64, k=4, b_pre_init="mean")
    fused, separate, clipped = (
        Trainer(init_sae(32, cfg, x, 0), TrainConfig(batch_size=256, grad_clip_norm=clip))
        for clip in (None, None, 1e9)
    )
    monkeypatch.setattr(separate.sae, "unit_row_decoder", lambda: None)
    for step in range(2):
        for t in (fused, separate, clipped):
            t.step(x[step * 256 : (step + 1) * 256])
    W = fused.sae.W_dec
    assert unit_adam.packed(W).numel() > 0 and unit_adam.packed(clipped.sae.W_dec).numel() == 0
    for other in (separate, clipped):
        torch.testing.assert_close(W, other.sae.W_dec, rtol=0, atol=2e-6)
        s0, s1 = fused.opt.state[W], other.opt.state[other.sae.W_dec]
        assert torch.equal(s0["step"], s1["step"]) and s0["step"].dtype == s1["step"].dtype
        torch.testing.assert_close(s0["exp_avg"], s1["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s0["exp_avg_sq"], s1["exp_avg_sq"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(fused.sae.W_enc, other.sae.W_enc, rtol=0, atol=2e-6)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(64))


def test_feature_recovery_on_a_known_sparse_dictionary():
    x, features = sparse_dictionary_data(2**14, d=32, n_features=64, active=3)
    sae_cfg = SAEConfig(n_latents=128, k=3, normalize="none", dead_window_tokens=4096)
    train_cfg = TrainConfig(batch_size=256, epochs=6, lr=3e-3)
    trainer = run_training(
        32,
        sae_cfg,
        train_cfg,
        tensor_source(x, 256, 0),
        len(x) // 256,
        lambda: x[:4096],
        progress=False,
    )
    max_cos = (features @ trainer.final_sae().W_dec.detach().T).max(dim=1).values
    recovered = (max_cos > 0.9).float().mean().item()
    print(f"recovered {recovered:.3f} of 64 features; median max cosine {max_cos.median():.4f}")
    assert recovered >= 0.9


def test_dead_window_is_counted_in_tokens():
    dead = DeadLatents(n=4, window=1000)
    idx, vals = torch.tensor([[0, 1]] * 300), torch.ones(300, 2)
    for _ in range(3):  # 900 tokens: nothing dead yet
        dead.update(idx, vals)
    assert not dead.mask().any()
    dead.update(idx[:100], vals[:100])  # 1000 tokens without latents 2, 3
    assert dead.mask().tolist() == [False, False, True, True]
    dead.update(torch.tensor([[2, 3]]), torch.tensor([[1.0, 1e-4]]))  # 3 fires; 1e-4 is no firing
    assert dead.mask().tolist() == [False, False, False, True]


def _dead_after_training(aux_alpha: float) -> tuple[float, float]:
    """Data in a 24-dim subspace of R^32 (768 features, 4 active); half the latents start almost
    orthogonal to it, so they never win the top-k on their own."""
    d, sub = 32, 24
    g = torch.Generator().manual_seed(1)
    feats = torch.cat([torch.randn(768, sub, generator=g), torch.zeros(768, d - sub)], dim=1)
    feats /= feats.norm(dim=1, keepdim=True)
    which = torch.rand(2**14, 768, generator=g).argsort(dim=1)[:, :4]
    x = ((torch.rand(2**14, 4, generator=g) * 0.9 + 0.1)[..., None] * feats[which]).sum(dim=1)
    cfg = SAEConfig(
        n_latents=128, k=4, normalize="none", dead_window_tokens=2048, aux_alpha=aux_alpha
    )
    sae = init_sae(d, cfg, x[:4096], seed=0)
    with torch.no_grad():
        W = sae.W_dec.clone()
        W[64:, :sub] *= 0.05
        W /= W.norm(dim=1, keepdim=True)
        sae.W_dec.copy_(W)
        sae.W_enc.copy_(W)
    trainer = Trainer(sae, TrainConfig(batch_size=256, lr=3e-3))
    source = tensor_source(x, 256, 0)
    for epoch in range(8):
        for batch in source(epoch, 0):
            trainer.step(batch)
    return trainer.dead.fraction(), trainer.state.history[-1]["nmse"]


def test_auxk_revives_dead_latents():
    dead_plain, nmse_plain = _dead_after_training(aux_alpha=0.0)
    dead_aux, nmse_aux = _dead_after_training(aux_alpha=1 / 32)
    print(
        f"dead fraction: TopK {dead_plain:.3f} (nmse {nmse_plain:.3f}), TopK+AuxK {dead_aux:.3f} (nmse {nmse_aux:.3f})"
    )
    assert dead_plain >= 0.4
    assert dead_aux <= 0.1
    assert nmse_aux < nmse_plain


def _batch_topk_trained(train_cfg: TrainConfig) -> tuple[Trainer, torch.Tensor]:
    """A BatchTopK SAE (k = 4) trained on 2^13 sparse-dictionary rows: (trainer, held-out rows)."""
    x, _ = sparse_dictionary_data(2**13 + 2048, d=32, n_features=64, active=3)
    train, held = x[: 2**13], x[2**13 :]
    sae_cfg = SAEConfig(n_latents=128, k=4, batch_topk=True, dead_window_tokens=2048)
    trainer = run_training(
        32, sae_cfg, train_cfg, tensor_source(train, 256, 0), len(train) // 256,
        lambda: train[:2048], progress=False,
    )  # fmt: skip
    return trainer, held


def test_batch_topk_averages_k_in_training_and_its_threshold_on_held_out_data():
    trainer, held = _batch_topk_trained(TrainConfig(batch_size=256, epochs=3, lr=3e-3))
    l0 = [r["l0"] for r in trainer.state.history]
    codes = trainer.sae.encode(held)
    held_l0 = float((codes.vals > 0).sum(dim=1).float().mean())
    print(f"BatchTopK L0: training {sum(l0) / len(l0):.3f}, held-out {held_l0:.3f} (k = 4)")
    assert all(abs(v - 4) < 1e-6 for v in l0)  # k B of each batch, k per token on average
    assert (codes.vals > 0).sum(dim=1).max() > 4  # tokens differ: some use more than k
    assert 0.8 * 4 <= held_l0 <= 1.2 * 4


def test_ema_weights_are_what_gets_saved(tmp_path):
    store = Store(str(tmp_path / "store"))
    x, _ = sparse_dictionary_data(2048)
    acts = write_activations(store, "activations/ema", x, x[:256])
    train_cfg = TrainConfig(
        batch_size=256, epochs=2, lr=3e-3, device="cpu", ema_decay=0.8, recipe="paper"
    )
    with store.writing("sae/ema") as writer:
        train_sae(
            acts, SAEConfig(n_latents=48, k=3), train_cfg, writer, "checkpoints/ema", progress=False
        )
    assert store.manifest("sae/ema")["weights"] == "ema"
    saved = load_sae(DatasetRef(store=store.uri, path="sae/ema", fingerprint="test"))
    ckpt = load_tensors(store.read_bytes(f"checkpoints/ema/{CHECKPOINT_FILE}"))
    for name, p in saved.named_parameters():
        assert torch.equal(p, ckpt[f"ema.{name}"]), name  # the moving average...
        assert not torch.equal(p, ckpt[f"model.{name}"]), name  # ...not the last weights


def test_bf16_gemm_trains_and_float32_stays_the_default():
    assert TrainConfig().dtype == "float32"
    x, _ = sparse_dictionary_data(4096)
    curves = {}
    for dtype in ("float32", "bfloat16"):
        sae = init_sae(32, SAEConfig(n_latents=64, k=3), x[:1024], seed=0)
        trainer = Trainer(sae, TrainConfig(batch_size=256, lr=3e-3, dtype=dtype))
        source = tensor_source(x, 256, 0)
        for epoch in range(2):
            for batch in source(epoch, 0):
                trainer.step(batch)
        assert sae._pre_buffer.dtype == getattr(torch, dtype)  # the GEMM ran in this dtype...
        assert sae.W_enc.dtype == torch.float32  # ...the weights and the rest stay float32
        curves[dtype] = [r["nmse"] for r in trainer.state.history]
    bf16, fp32 = curves["bfloat16"], curves["float32"]
    assert bf16[-1] < 0.85 * bf16[0]  # it learns...
    assert abs(bf16[-1] - fp32[-1]) < 0.02 * fp32[-1]  # ...about as well as float32


def test_the_shipped_batch_topk_threshold_keeps_k_per_token_after_schedule_free_averaging():
    trainer, held = _batch_topk_trained(TrainConfig(batch_size=256, epochs=3, recipe="budget"))
    assert trainer.threshold_rows is not None and trainer.threshold_rows.shape == (2048, 32)
    shipped = trainer.final_sae()
    trainer.threshold_rows = None
    tracked = trainer.final_sae()  # the threshold as training tracked it, on other weights

    def held_l0(sae) -> float:
        return float((sae.encode(held).vals > 0).sum(dim=1).float().mean())

    print(f"held-out L0 (k = 4): calibrated {held_l0(shipped):.3f}, tracked {held_l0(tracked):.3f}")
    assert float(shipped.threshold) != float(tracked.threshold)
    assert 0.9 * 4 <= held_l0(shipped) <= 1.1 * 4
