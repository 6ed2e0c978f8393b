"""The TopK SAE model: the recipe's invariants, AuxK selection, raw-space codec, safetensors I/O."""

from __future__ import annotations

import io

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae import TopKSAE
from sae_core.sae.normalize import InputNorm
from sae_core.sae.safetensors_io import safetensors_metadata


def _sae(normalize: str = "per_token", **kw) -> TopKSAE:
    torch.manual_seed(0)
    cfg = SAEConfig(n_latents=96, k=5, normalize=normalize, **kw)
    x = torch.randn(512, 20) * 3 + 1
    sae = TopKSAE(20, cfg, InputNorm.fit(normalize, x))
    with torch.no_grad():
        sae.b_pre.normal_(0, 0.1)
        sae.b_enc.normal_(0, 0.1)
    return sae


def test_tied_init_and_unit_norm_decoder_rows():
    sae = TopKSAE(20, SAEConfig(n_latents=96, k=5))
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert sae.W_enc.data_ptr() != sae.W_dec.data_ptr()  # tied at init only
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96))
    assert sae.k_aux == 10  # default d / 2


def test_relu_after_topk_and_exactly_k_selected():
    sae = _sae()
    with torch.no_grad():
        sae.b_enc.fill_(-10.0)  # every pre-activation negative: selected, then zeroed
    out = sae(torch.randn(8, 20))
    assert out.latent_idx.shape == (8, 5) and (out.latent_vals == 0).all()


def test_projected_gradient_is_orthogonal_and_step_keeps_unit_norm():
    sae = _sae()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x, _ = sae.norm.apply(torch.randn(64, 20))
    sae(x).loss.backward()
    raw_parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max()
    sae.project_decoder_grad()
    parallel = (sae.W_dec.grad * sae.W_dec).sum(dim=1).abs().max()
    assert raw_parallel > 1e-4 and parallel < 1e-7
    opt.step()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-5  # the step alone leaves the sphere
    sae.normalize_decoder()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(96), atol=1e-6)


def test_aux_uses_only_dead_latents_and_only_when_some_are_dead():
    sae = _sae(k_aux=7)
    x, _ = sae.norm.apply(torch.randn(32, 20))
    none_dead = sae(x, torch.zeros(96, dtype=torch.bool))
    assert none_dead.aux_loss == 0 and none_dead.aux_idx.shape == (32, 0)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    out = sae(x, dead)
    assert out.aux_idx.shape == (32, 7) and dead[out.aux_idx].all()
    assert out.aux_loss > 0
    # The residual is detached: AuxK alone sends no gradient to the live latents' decoder rows.
    sae.zero_grad()
    out.aux_loss.backward()
    live_rows = sae.W_dec.grad[~dead]
    assert live_rows.abs().max() == 0 and sae.W_dec.grad[dead].abs().max() > 0


def test_aux_top_k_capped_by_dead_count():
    sae = _sae(k_aux=50)
    dead = torch.zeros(96, dtype=torch.bool)
    dead[:3] = True
    assert sae(torch.randn(4, 20), dead).aux_idx.shape == (4, 3)


@pytest.mark.parametrize("normalize", ["per_token", "global", "none"])
def test_raw_codec_round_trip(normalize):
    sae = _sae(normalize)
    x_raw = torch.randn(40, 20) * 3 + 1
    codes = sae.encode(x_raw)
    assert codes.idx.shape == (40, 5) and (codes.vals >= 0).all()
    x_hat = sae.decode(*codes)
    # decode maps back to raw space exactly: same as reconstructing in normalised space, inverted.
    xn, stats = sae.norm.apply(x_raw)
    expected = sae.norm.invert(sae(xn).recon.detach(), stats)
    torch.testing.assert_close(x_hat, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.reconstruct(x_raw), x_hat)


def test_perfect_dictionary_reconstructs_raw_exactly():
    # Inputs that ARE k-sparse codes of the decoder reconstruct to themselves in raw space.
    torch.manual_seed(3)
    # Decoder rows +-q_i of an orthonormal basis: for every token exactly one of each pair has a
    # positive pre-activation, so the top-16 after ReLU is the token's exact expansion.
    sae = TopKSAE(16, SAEConfig(n_latents=32, k=16, normalize="per_token"))
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(16, 16)).Q
        sae.W_dec.copy_(torch.cat([q, -q]))
        sae.W_enc.copy_(torch.cat([q, -q]))
    x_raw = torch.randn(8, 16) * 5 - 2
    torch.testing.assert_close(sae.reconstruct(x_raw), x_raw, rtol=1e-4, atol=1e-4)


def test_per_token_decode_without_stats_is_a_clear_error():
    sae = _sae("per_token")
    codes = sae.encode(torch.randn(2, 20))
    with pytest.raises(ConfigError, match="stats"):
        sae.decode(codes.idx, codes.vals)


def test_safetensors_round_trip_path_fileobj_and_bytes(tmp_path):
    sae = _sae("global", multi_topk=True)
    path = tmp_path / "sae.safetensors"
    sae.save_safetensors(path)
    buf = io.BytesIO()
    sae.save_safetensors(buf)
    meta = safetensors_metadata(path.read_bytes())
    assert meta["format"] == "saeflow.topk" and '"global"' in meta["normalization"]
    x = torch.randn(6, 20)
    for loaded in (
        TopKSAE.load_safetensors(path),
        TopKSAE.load_safetensors(io.BytesIO(buf.getvalue())),
        TopKSAE.load_safetensors(path.read_bytes()),
    ):
        assert loaded.cfg == sae.cfg and loaded.norm == sae.norm
        for name, p in sae.named_parameters():
            assert torch.equal(p, dict(loaded.named_parameters())[name])
        torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))


def test_loading_a_foreign_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match="not a saeflow"):
        TopKSAE.load_safetensors(tmp_path / "x.safetensors")


def test_batch_topk_keeps_exactly_the_k_b_largest_of_the_batch():
    from sae_core.sae.base import batch_topk

    g = torch.Generator().manual_seed(7)
    pre = torch.randn(40, 96, generator=g)
    pre[3] += 4  # one token holds far more than 2k of the batch's largest: the candidate pool grows
    vals, idx, thr = batch_topk(pre, 5)
    kept = vals > float("-inf")
    assert int(kept.sum()) == 40 * 5
    expected = pre.reshape(-1).topk(40 * 5).values
    assert torch.equal(vals[kept].sort(descending=True).values, expected)
    assert torch.equal(pre.gather(1, idx)[kept], vals[kept]) and thr == expected[-1]
    assert int(kept[3].sum()) > 10  # far more than 2k for that token


def test_batch_topk_encode_uses_the_threshold_and_it_round_trips(tmp_path):
    sae = _sae(batch_topk=True)
    x = torch.randn(30, 20)
    assert sae.encode(x).idx.shape == (30, 5)  # no threshold yet: top k per token
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    codes = sae.encode(x)
    xn, _ = sae.norm.apply(x)
    pre = sae.preacts(xn)
    assert torch.equal((codes.vals > 0).sum(dim=1), (pre > 0.3).sum(dim=1))
    assert ((codes.vals == 0) | (codes.vals > 0.3)).all()
    sae.save_safetensors(tmp_path / "b.safetensors")
    loaded = TopKSAE.load_safetensors(tmp_path / "b.safetensors")
    assert loaded.threshold == sae.threshold
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x))


def test_a_calibrated_threshold_keeps_exactly_k_per_row_on_its_rows():
    torch.manual_seed(0)
    sae = TopKSAE(16, SAEConfig(n_latents=64, k=3, batch_topk=True))
    rows = torch.randn(512, 16)
    sae.calibrate_threshold_(rows, chunk=512)
    active = (sae.encode(rows).vals > 0).sum()
    assert int(active) == 3 * 512  # the boundary of the one chunk: k per row on average
    sae.calibrate_threshold_(rows, chunk=128)  # four chunks: their boundaries' mean
    per_row = float((sae.encode(rows).vals > 0).sum()) / 512
    assert abs(per_row - 3) < 0.3
