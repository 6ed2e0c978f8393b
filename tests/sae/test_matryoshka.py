"""Matryoshka SAEs: the prefix sizes and their validation, the nested decode and the summed
prefix losses against a dense reference (values and gradients, BatchTopK and TopK, with AuxK),
training, the file round trip, and the SAELens export (JumpReLU layout) read back and run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_core.config import SAEConfig, TrainConfig, build_config
from sae_core.errors import ConfigError
from sae_core.sae import MatryoshkaSAE, build_sae, load_sae_bytes
from sae_core.sae.export import export_sae
from sae_core.sae.importer import import_sae
from sae_core.sae.matryoshka import dense_nested_decode, nested_decode, prefix_groups
from sae_core.sae.normalize import InputNorm
from sae_core.training.trainer import Trainer, init_sae
from tests.helpers import HELPERS
from tests.sae.test_export import ORIGIN, activations, run_saelens
from tests.sae.test_export_peers import PEERS

D, N, K = 32, 128, 8
PREFIXES = [8, 32, 128]


def make_sae(mode: str = "none", batch_topk: bool = True, threshold: float = 0.3) -> MatryoshkaSAE:
    """A random Matryoshka SAE, weights perturbed off the tied init, BatchTopK's threshold set."""
    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(
        kind="matryoshka", n_latents=N, k=K, matryoshka_prefixes=PREFIXES, batch_topk=batch_topk,
        normalize=mode, k_aux=6,
    )  # fmt: skip
    sae = build_sae(D, cfg, InputNorm(mode, 0.37), g)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if batch_topk:
            sae.threshold.fill_(threshold)
    assert isinstance(sae, MatryoshkaSAE)
    return sae


# Configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prefixes", "sizes"),
    [
        (None, (8, 32, 128)),
        ([0.0625, 0.25, 1], (8, 32, 128)),
        ([16, 128], (16, 128)),
        ([1], (128,)),
    ],
)
def test_prefixes_resolve_from_counts_or_fractions(prefixes, sizes):
    cfg = SAEConfig(kind="matryoshka", n_latents=N, k=K, matryoshka_prefixes=prefixes)
    assert cfg.prefix_sizes() == sizes
    assert cfg.batch_topk  # Matryoshka BatchTopK unless asked otherwise
    assert not SAEConfig(kind="matryoshka", n_latents=N, k=K, batch_topk=False).batch_topk


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["sae.matryoshka_prefixes=[64,32,128]"], "larger than the one before"),
        (["sae.matryoshka_prefixes=[8,32]"], "the last prefix must be the whole dictionary"),
        (["sae.matryoshka_prefixes=[8.5,128]"], "must be integers"),
        (["sae.matryoshka_prefixes=[0.001,0.002,1]"], "resolves to [0, 0, 128]"),
        (["sae.matryoshka_prefixes=[-1,128]"], "give positive sizes"),
        (["sae.n_latents=8", "sae.k=2"], "(default) resolves to [0, 2, 8]"),
        (["sae.batch_topk=false", "sae.multi_topk=true"], "cannot be combined"),
        (["sae.degree=4"], "does not use sae.degree"),
    ],
)
def test_bad_prefixes_are_one_line_naming_the_field(sets, needle):
    base = ["sae.kind=matryoshka", "sae.n_latents=128", "sae.k=8"]
    with pytest.raises(ConfigError) as err:
        build_config({}, [*base, *sets])
    message = str(err.value)
    assert len(message.splitlines()) == 1 and needle in message, message
    assert "sae.matryoshka_prefixes" in message or "sae.kind=matryoshka" in message


def test_other_kinds_refuse_prefixes():
    with pytest.raises(ConfigError, match="sae.kind=topk does not use sae.matryoshka_prefixes"):
        build_config({}, ["sae.matryoshka_prefixes=[0.5,1]"])


def test_a_sweep_over_n_resolves_fractions_per_point_and_names_a_point_counts_do_not_fit():
    from sae_core.studies.sweep import grid

    sets = ["sae.kind=matryoshka", "sweep.n_latents=[64,256]", "sweep.k=[8]"]
    points = grid(build_config({}, sets))
    assert [p.sae.prefix_sizes() for p in points] == [(4, 16, 64), (16, 64, 256)]
    counts = build_config({}, [*sets, "sae.matryoshka_prefixes=[16,64]", "sae.n_latents=64"])
    with pytest.raises(ConfigError, match="sweep point n=256, k=8: .*whole dictionary"):
        grid(counts)


# The nested decode and the loss against the dense reference ------------------------------------
def test_prefix_groups_are_the_first_prefix_holding_each_latent():
    idx = torch.tensor([[0, 7, 8, 31, 32, 127]])
    assert prefix_groups(idx, (8, 32, 128)).tolist() == [[0, 0, 1, 1, 2, 2]]


def test_nested_decode_equals_the_dense_prefixes_with_gradients():
    g = torch.Generator().manual_seed(2)
    B, sizes = 24, (8, 32, 128)
    idx = torch.rand(B, N, generator=g).argsort(dim=1)[:, :K]  # distinct latents per token
    idx[0] = torch.arange(100, 100 + K)  # a token with nothing in the inner prefixes
    vals = torch.rand(B, K, generator=g).requires_grad_()
    W = torch.randn(N, D, generator=g).requires_grad_()
    bias = torch.randn(D, generator=g).requires_grad_()
    weights = torch.randn(B, len(sizes), D, generator=g)
    grads = []
    for decode in (nested_decode, dense_nested_decode):
        out = decode(idx, vals, W, sizes, bias)
        grads.append((out, *torch.autograd.grad((out * weights).sum(), (vals, W, bias))))
    for sparse, dense in zip(*grads, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][0][0, :2], bias.detach().expand(2, D))  # empty prefixes


def reference_loss(sae: MatryoshkaSAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """The definition on dense tensors: z = ReLU of the kept pre-activations (the k B largest of
    the batch, or the k largest per token), loss = sum over prefixes s of |x - z[:, :s] W[:s] -
    b_pre|^2 / |x - mean x|^2, plus aux_alpha times AuxK's normalised MSE of the full residual."""
    pre = (x - sae.b_pre) @ sae.W_enc.T + sae.b_enc
    if sae.cfg.batch_topk:
        flat = torch.relu(pre.detach()).reshape(-1)
        kept = torch.zeros_like(flat, dtype=torch.bool)
        kept[flat.topk(sae.k * x.shape[0]).indices] = True
        kept = kept.view_as(pre) & (pre.detach() > 0)
    else:
        kept = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.topk(sae.k).indices, True)
    z = torch.relu(pre) * kept
    spread = (x - x.mean(dim=0)).pow(2).sum()
    loss = sum((x - z[:, :s] @ sae.W_dec[:s] - sae.b_pre).pow(2).sum() / spread for s in sae.sizes)
    residual = (x - z @ sae.W_dec - sae.b_pre).detach()
    dead_pre = pre.masked_fill(~dead, float("-inf"))
    top = dead_pre.topk(min(sae.k_aux, int(dead.sum())), dim=1)
    z_aux = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values))
    aux_spread = (residual - residual.mean(dim=0)).pow(2).sum()
    return loss + sae.cfg.aux_alpha * (residual - z_aux @ sae.W_dec).pow(2).sum() / aux_spread


@pytest.mark.parametrize("batch_topk", [True, False])
def test_summed_prefix_losses_and_gradients_equal_the_dense_reference(batch_topk):
    sae = make_sae(batch_topk=batch_topk)
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(N, dtype=torch.bool)
    dead[96:] = True  # AuxK picks among these
    grads = []
    for loss_of in (lambda: sae(x, dead).loss, lambda: reference_loss(sae, x, dead)):
        sae.zero_grad()
        loss = loss_of()
        loss.backward()
        grads.append([loss.detach(), *(p.grad.clone() for p in sae.parameters())])
    for sparse, dense in zip(*grads, strict=True):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-6)


def test_the_loss_is_the_sum_of_every_prefix_and_nmse_is_the_whole_dictionarys():
    sae = make_sae()
    x = torch.randn(48, D, generator=torch.Generator().manual_seed(4))
    out = sae(x)
    one_prefix = build_sae(D, sae.cfg.model_copy(update={"matryoshka_prefixes": [1]}))
    one_prefix.load_state_dict(sae.state_dict())
    plain = one_prefix(x)
    torch.testing.assert_close(out.nmse, plain.nmse)  # same selection, same full reconstruction
    assert out.loss > out.nmse and torch.allclose(plain.loss, plain.nmse)


# Training ------------------------------------------------------------------------------------------
def test_training_steps_set_the_threshold_and_use_auxk(one_thread):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2048, D, generator=g) * 2 + 1
    cfg = SAEConfig(
        kind="matryoshka", n_latents=N, k=K, matryoshka_prefixes=PREFIXES, dead_window_tokens=256
    )
    sae = init_sae(D, cfg, x[:512], seed=0)
    with torch.no_grad():
        sae.b_enc[96:] = -50.0  # silenced: dead after the first batch, AuxK's from then on
    trainer = Trainer(sae, TrainConfig(batch_size=256, lr=1e-3))
    records = [trainer.step(batch) for batch in x.split(256)]
    assert not torch.isnan(trainer.sae.threshold)
    assert all(r["loss"] > r["nmse"] for r in records)  # the inner prefixes' terms
    assert records[0]["aux_loss"] == 0 and all(r["aux_loss"] > 0 for r in records[1:])
    assert records[-1]["nmse"] < records[0]["nmse"]
    assert abs(records[-1]["l0"] - K) < 1e-6  # BatchTopK: k per token on average


def test_inner_prefixes_learn_to_reconstruct_alone(one_thread):
    """The point of the kind. On sparse features of falling frequency, trained alike, a
    Matryoshka SAE's first 8 latents reconstruct alone about twice as well as a BatchTopK SAE's
    first 8 (which are arbitrary), at about the same NMSE for the whole dictionary."""
    g = torch.Generator().manual_seed(6)
    features = torch.nn.functional.normalize(torch.randn(64, D, generator=g), dim=1)
    active = torch.rand(4096, 64, generator=g) < 0.6 * 0.9 ** torch.arange(64.0)
    x = (active * (0.5 + torch.rand(4096, 64, generator=g))) @ features
    nmse = {}
    for kind in ("topk", "matryoshka"):
        extra = {"matryoshka_prefixes": PREFIXES} if kind == "matryoshka" else {}
        cfg = SAEConfig(kind=kind, n_latents=N, k=K, batch_topk=True, **extra)
        train = TrainConfig(batch_size=256, lr=1e-2, recipe="paper")
        trainer = Trainer(init_sae(D, cfg, x[:1024], seed=0), train)
        for batch in [*x.split(256), *x.split(256)]:
            trainer.step(batch)
        sae = trainer.sae
        codes = sae.encode(x[:2048])
        xn, _ = sae.norm.apply(x[:2048])
        with torch.no_grad():
            recons = nested_decode(codes.idx, codes.vals, sae.W_dec, (8, N), sae.b_pre)
        spread = (xn - xn.mean(0)).pow(2).sum()
        nmse[kind] = [float((xn - recons[:, p]).pow(2).sum() / spread) for p in range(2)]
    (first8_topk, all_topk), (first8, whole) = nmse["topk"], nmse["matryoshka"]
    assert first8 < 0.75 * first8_topk and whole < 1.25 * all_topk + 0.02, nmse


def test_the_file_round_trips_the_kind_prefixes_and_threshold():
    sae = make_sae("per_token")
    back = load_sae_bytes(sae.to_bytes())
    assert isinstance(back, MatryoshkaSAE) and back.sizes == (8, 32, 128)
    assert back.cfg == sae.cfg and float(back.threshold) == pytest.approx(0.3)
    x = activations()
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x))


# Export ------------------------------------------------------------------------------------------
def run_saelens_jumprelu(folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' JumpReLUSAE forward (sae_lens/saes/jumprelu_sae.py), from the files alone: the
    TopK runner's with ReLU(pre) kept where pre > threshold instead of the top k."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu" and "k" not in cfg
    x_in, mu, std = x, 0.0, 1.0
    if cfg["normalize_activations"] == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        x_in = (x - mu) / (std + 1e-5)
    hidden = (x_in - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    acts = torch.relu(hidden) * (hidden > w["threshold"])
    out = acts @ w["W_dec"] + w["b_dec"]
    return acts, out * std + mu if cfg["normalize_activations"] == "layer_norm" else out


def dense_codes(sae: MatryoshkaSAE, x: torch.Tensor) -> torch.Tensor:
    codes = sae.encode(x)
    return torch.zeros(x.shape[0], N).scatter_(1, codes.idx, codes.vals)


@pytest.mark.parametrize("mode", ["per_token", "global", "none"])
def test_saelens_export_is_its_jumprelu_layout_and_reconstructs_as_saeflow_does(tmp_path, mode):
    sae, x = make_sae(mode), activations()
    export_sae(sae, tmp_path, "saelens", ORIGIN)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["matryoshka_widths"] == PREFIXES and cfg["d_sae"] == N
    threshold = load_file(str(tmp_path / "sae_weights.safetensors"))["threshold"]
    assert threshold.shape == (N,) and torch.allclose(threshold, torch.full((N,), 0.3))
    latents, recon = run_saelens_jumprelu(tmp_path, x)
    assert (latents > 0).sum(dim=1).float().mean() > 1  # the threshold keeps some latents
    torch.testing.assert_close(latents, dense_codes(sae, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recon, sae.reconstruct(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch_topk", [True, False])
def test_import_reads_the_export_back_to_the_same_matryoshka_sae(tmp_path, batch_topk):
    sae, x = make_sae("per_token", batch_topk=batch_topk), activations()
    export_sae(sae, tmp_path, "saelens", ORIGIN)
    back, origin = import_sae(tmp_path)
    assert isinstance(back, MatryoshkaSAE) and back.cfg == sae.cfg and origin == ORIGIN
    if batch_topk:
        assert float(back.threshold) == pytest.approx(0.3)
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense_codes(back, x), dense_codes(sae, x), rtol=1e-5, atol=1e-5)


def test_per_token_topk_matryoshka_exports_as_topk(tmp_path):
    sae, x = make_sae("none", batch_topk=False), activations()
    export_sae(sae, tmp_path, "saelens", ORIGIN)
    latents, recon = run_saelens(tmp_path, x)
    torch.testing.assert_close(recon, sae.reconstruct(x), rtol=1e-4, atol=1e-4)


def test_a_thresholded_sae_is_refused_by_sparsify_and_a_foreign_jumprelu_by_import(tmp_path):
    with pytest.raises(ConfigError, match="sparsify has no inference threshold"):
        export_sae(make_sae(), tmp_path / "s", "sparsify")
    export_sae(make_sae(), tmp_path / "j", "saelens")
    weights = tmp_path / "j" / "sae_weights.safetensors"
    tensors = load_file(str(weights))
    tensors["threshold"] = torch.linspace(0.1, 0.5, N)  # JumpReLU proper: one per latent
    save_file(tensors, str(weights))
    with pytest.raises(ConfigError, match="threshold: latents with thresholds of their own"):
        import_sae(tmp_path / "j")


def test_cli_export_and_import_of_a_matryoshka_sae(tmp_path):
    from tests.helpers.cli import assert_one_line_error, invoke

    sae, x = make_sae("per_token"), activations()
    source = tmp_path / "sae.safetensors"
    sae.save_safetensors(source)
    refused = invoke("export", str(source), "-f", "sparsify", "--out", str(tmp_path / "s"))
    assert_one_line_error(refused, "sparsify has no inference threshold", "--format saelens")
    assert not (tmp_path / "s" / "cfg.json").exists()
    out, back = tmp_path / "saelens", tmp_path / "back.safetensors"
    assert invoke("export", str(source), "-f", "saelens", "--out", str(out)).exit_code == 0
    assert invoke("import", str(out), "--out", str(back)).exit_code == 0
    imported = load_sae_bytes(back.read_bytes())
    assert isinstance(imported, MatryoshkaSAE)
    torch.testing.assert_close(imported.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not PEERS.is_file(), reason=f"no peers venv at {PEERS}")
def test_saelens_loads_and_runs_the_export(tmp_path):
    """SAELens' own `SAE.load_from_disk` on the export (its JumpReLUSAE), in the peers venv."""
    sae, x = make_sae("per_token"), activations(256)
    folder = tmp_path / "saelens-matryoshka"
    export_sae(sae, folder, "saelens", ORIGIN)
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    proc = subprocess.run(
        [str(PEERS), str(HELPERS / "peer_export_worker.py"), str(tmp_path / "x.safetensors"),
         str(folder)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = load_file(str(folder.with_suffix(".out.safetensors")))
    torch.testing.assert_close(out["latents"], dense_codes(sae, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["recon"], sae.reconstruct(x), rtol=1e-4, atol=1e-4)
