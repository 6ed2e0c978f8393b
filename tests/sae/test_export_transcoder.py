"""Transcoders in sparsify's format: the folded weights compute what the transcoder computes,
by sparsify's own equations, and the folder reads back to the same transcoder."""

from __future__ import annotations

import json

import pytest
import torch

from sae_core.config import SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae import SkipTranscoderSAE, TranscoderSAE
from sae_core.sae.export import export_sae
from sae_core.sae.importer import import_sae
from sae_core.training.trainer import init_sae

D, N, K = 12, 48, 4


def _transcoder(kind: str) -> TranscoderSAE:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, D, generator=g) * 5 + 1, torch.randn(256, D, generator=g) * 0.3
    tc = init_sae(
        D, SAEConfig(kind=kind, n_latents=N, k=K, normalize="global"), torch.cat([x, y], 1), 0
    )
    with torch.no_grad():  # trained-looking weights: every term of the fold matters
        tc.b_enc.normal_(0, 0.3, generator=g)
        tc.b_pre.normal_(0, 0.5, generator=g)
        if tc.SKIP:
            tc.W_skip.normal_(0, 0.2, generator=g)
    return tc


def _sparsify_forward(folder, x: torch.Tensor) -> torch.Tensor:
    """sparsify's SparseCoder forward with transcode=True, from the files alone."""
    from safetensors.torch import load_file

    cfg = json.loads((folder / "cfg.json").read_text())
    t = load_file(str(folder / "sae.safetensors"))
    pre = torch.relu(x @ t["encoder.weight"].T + t["encoder.bias"])  # no b_dec subtracted
    vals, idx = pre.topk(cfg["k"], dim=1)
    y = torch.zeros(x.shape[0], cfg["num_latents"]).scatter(1, idx, vals) @ t["W_dec"] + t["b_dec"]
    return y + x @ t["W_skip"].T if cfg["skip_connection"] else y


@pytest.mark.parametrize("kind", ["transcoder", "skip_transcoder"])
def test_sparsify_folder_computes_the_transcoder_and_reads_back(kind, tmp_path):
    tc = _transcoder(kind)
    export_sae(tc, tmp_path, "sparsify")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["transcode"] is True and cfg["skip_connection"] == (kind == "skip_transcoder")
    x = torch.randn(64, D) * 5 + 1
    torch.testing.assert_close(
        _sparsify_forward(tmp_path, x), tc.reconstruct(x), rtol=1e-4, atol=1e-4
    )
    back, _ = import_sae(tmp_path)
    assert type(back) is type(tc) and back.out_norm == tc.out_norm and back.cfg == tc.cfg
    torch.testing.assert_close(back.reconstruct(x), tc.reconstruct(x), rtol=1e-4, atol=1e-4)


def test_a_plain_sparsify_transcoder_imports_without_normalisation(tmp_path):
    tc = _transcoder("skip_transcoder")
    export_sae(tc, tmp_path, "sparsify")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["saeflow"]  # as sparsify itself writes it
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back, _ = import_sae(tmp_path)
    assert isinstance(back, SkipTranscoderSAE) and back.norm.mode == back.out_norm.mode == "none"
    x = torch.randn(64, D) * 5 + 1
    torch.testing.assert_close(back.reconstruct(x), tc.reconstruct(x), rtol=1e-4, atol=1e-4)


def test_saelens_format_is_refused_for_transcoders(tmp_path):
    with pytest.raises(ConfigError, match="sparsify's format only"):
        export_sae(_transcoder("transcoder"), tmp_path, "saelens")
