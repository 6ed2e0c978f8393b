"""SAELens / sparsify export and import: the exported files, run the way each library runs them,
reconstruct raw activations as saeflow does; import reads them back to the same SAE."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app
from sae_core.config import SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae import TopKSAE
from sae_core.sae.export import export_sae
from sae_core.sae.formats import Origin, saeflow_hook, transformer_lens_hook
from sae_core.sae.importer import import_sae
from sae_core.sae.normalize import EPS, InputNorm

D, N, K = 32, 128, 8
ORIGIN = Origin(model="tiny-llama", hook="resid_post.3", context_size=64, skip_first_position=True)


def make_sae(mode: str) -> TopKSAE:
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(D, SAEConfig(n_latents=N, k=K, normalize=mode), InputNorm(mode, 0.37), g)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return sae


def activations(rows: int = 64) -> torch.Tensor:
    """Raw activations at a residual-stream-like scale: offset, per-token norms ~30."""
    g = torch.Generator().manual_seed(1)
    return 5.0 * torch.randn(rows, D, generator=g) + torch.randn(D, generator=g)


def dense(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    codes = sae.encode(x)
    return torch.zeros(x.shape[0], N).scatter_(1, codes.idx, codes.vals)


def run_saelens(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAELens' TopKSAE forward (sae_lens/saes/topk_sae.py + sae.py), from the files alone."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == "topk" and w["W_enc"].shape == (cfg["d_in"], cfg["d_sae"])
    if cfg["normalize_activations"] == "layer_norm":
        mu = x.mean(dim=-1, keepdim=True)
        std = (x - mu).std(dim=-1, keepdim=True)
        x_in = (x - mu) / (std + 1e-5)
    else:
        assert cfg["normalize_activations"] == "none"
        x_in = x
    hidden = (x_in - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"]
    top = hidden.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(hidden).scatter_(-1, top.indices, torch.relu(top.values))
    out = acts @ w["W_dec"] + w["b_dec"]
    if cfg["normalize_activations"] == "layer_norm":
        out = out * std + mu
    return acts, out


def run_sparsify(folder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder encode/decode (sparsify/sparse_coder.py), plus the per-token
    transform cfg.json's saeflow entry states when it could not be folded into the weights."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(str(folder / "sae.safetensors"))
    assert w["encoder.weight"].shape == (cfg["num_latents"], cfg["d_in"])
    per_token = cfg["saeflow"]["caller_applies_normalization"]
    assert per_token == (cfg["saeflow"]["normalization"]["mode"] == "per_token")
    if per_token:
        eps = cfg["saeflow"]["caller_transform"]["eps"]
        mu = x.mean(dim=-1, keepdim=True)
        scale = (x - mu).norm(dim=-1, keepdim=True).clamp_min(eps)
        x = (x - mu) / scale
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    top = pre.topk(cfg["k"], dim=-1)
    acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values)
    out = acts @ w["W_dec"] + w["b_dec"]
    return acts, out * scale + mu if per_token else out


RUNNERS = {"saelens": run_saelens, "sparsify": run_sparsify}


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("mode", ["per_token", "global", "none"])
def test_exported_sae_reconstructs_raw_activations_as_saeflow_does(tmp_path, fmt, mode):
    sae, x = make_sae(mode), activations()
    export_sae(sae, tmp_path, fmt, ORIGIN)
    latents, recon = RUNNERS[fmt](tmp_path, x)
    # SAELens adds 1e-5 to the per-token std: a relative 1e-5/std ~ 2e-6 here.
    torch.testing.assert_close(latents, dense(sae, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(recon, sae.reconstruct(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
@pytest.mark.parametrize("mode", ["per_token", "global", "none"])
def test_import_reads_the_export_back_to_the_same_sae(tmp_path, fmt, mode):
    sae, x = make_sae(mode), activations()
    export_sae(sae, tmp_path, fmt, ORIGIN)
    back, origin = import_sae(tmp_path)
    assert back.cfg == sae.cfg and back.norm == sae.norm and origin == ORIGIN
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(back.encode(x).idx, sae.encode(x).idx)


def test_saelens_files_follow_its_layout(tmp_path):
    export_sae(make_sae("per_token"), tmp_path, "saelens", ORIGIN)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (D, N, K)
    assert cfg["normalize_activations"] == "layer_norm"
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "tiny-llama"
    shapes = {
        k: tuple(v.shape) for k, v in load_file(str(tmp_path / "sae_weights.safetensors")).items()
    }
    assert shapes == {"W_enc": (D, N), "W_dec": (N, D), "b_enc": (N,), "b_dec": (D,)}


@pytest.mark.parametrize("mode", ["per_token", "global"])
def test_sparsify_cfg_states_the_transform_a_caller_applies(tmp_path, mode):
    export_sae(make_sae(mode), tmp_path, "sparsify", ORIGIN)
    transform = json.loads((tmp_path / "cfg.json").read_text())["saeflow"]["caller_transform"]
    if mode == "global":  # folded into the weights: nothing to do
        assert transform.startswith("none")
        return
    assert transform["eps"] == EPS
    assert (
        "m = mean(x)" in transform["before_encode"]
        and "max(||x - m||_2, eps)" in (transform["before_encode"])
    )
    assert transform["after_decode"].startswith("x_hat = decode(codes) * s + m")


def test_saelens_metadata_names_the_positions_trained_on(tmp_path):
    export_sae(make_sae("per_token"), tmp_path / "a", "saelens", ORIGIN)
    meta = json.loads((tmp_path / "a" / "cfg.json").read_text())["metadata"]
    assert meta["seqpos_slice"] == [1, None]  # position 0 left out: slice(1, None)
    all_positions = ORIGIN.model_copy(update={"skip_first_position": False})
    export_sae(make_sae("per_token"), tmp_path / "b", "saelens", all_positions)
    assert json.loads((tmp_path / "b" / "cfg.json").read_text())["metadata"]["seqpos_slice"] == [
        None
    ]


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_exported_files_are_readable_as_the_umask_allows(tmp_path, fmt):
    previous = os.umask(0o022)
    try:
        files = export_sae(make_sae("per_token"), tmp_path, fmt, ORIGIN)
    finally:
        os.umask(previous)
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o644 for f in files}


def test_foreign_saelens_layer_norm_sae_imports_as_per_token(tmp_path):
    """A file another tool wrote (no saeflow entry): layer_norm becomes per_token."""
    sae, x = make_sae("per_token"), activations()
    export_sae(sae, tmp_path, "saelens", ORIGIN)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["saeflow"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    back, origin = import_sae(tmp_path)
    assert back.norm.mode == "per_token" and origin.hook == "resid_post.3"
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_foreign_sparsify_folder_names_its_hookpoint(tmp_path):
    folder = tmp_path / "layers.5"
    export_sae(make_sae("none"), folder, "sparsify")
    cfg = json.loads((folder / "cfg.json").read_text())
    del cfg["saeflow"]
    (folder / "cfg.json").write_text(json.dumps(cfg))
    back, origin = import_sae(folder)
    assert back.norm.mode == "none" and origin.hook == "resid_post.5" and back.k == K


def test_unsupported_inputs_name_the_field(tmp_path):
    export_sae(make_sae("none"), tmp_path, "saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ConfigError, match="architecture: 'gated' is not TopK"):
        import_sae(tmp_path)
    with pytest.raises(ConfigError, match="no SAELens .* or sparsify"):
        import_sae(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="export format 'onnx'"):
        export_sae(make_sae("none"), tmp_path, "onnx")


def test_hook_names_map_both_ways():
    assert transformer_lens_hook("mlp_out.7") == "blocks.7.hook_mlp_out"
    assert saeflow_hook("blocks.7.hook_mlp_out") == "mlp_out.7"
    assert saeflow_hook("model.layers.12") == "resid_post.12"
    assert saeflow_hook("blocks.1.attn.hook_z") is None
    assert math.isclose(0.37, make_sae("global").norm.global_scale)


def test_cli_export_then_import_round_trips(tmp_path):
    sae, x = make_sae("per_token"), activations()
    source = tmp_path / "sae.safetensors"
    sae.save_safetensors(source)
    runner = CliRunner()
    out = tmp_path / "exported"
    result = runner.invoke(
        app,
        ["export", str(source), "--format", "saelens", "--out", str(out), "--hook", "resid_post.3"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "sae_weights.safetensors").is_file()
    back_file = tmp_path / "back.safetensors"
    result = runner.invoke(app, ["import", str(out), "--out", str(back_file)])
    assert result.exit_code == 0, result.output
    assert "saelens" in result.output and "resid_post.3" in result.output
    back = TopKSAE.load_safetensors(back_file)
    torch.testing.assert_close(back.reconstruct(x), sae.reconstruct(x), rtol=1e-5, atol=1e-5)


def test_cli_import_of_a_bad_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["import", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.startswith("error:") and "no SAELens" in result.output
