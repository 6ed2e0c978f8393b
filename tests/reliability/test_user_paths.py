"""Paths a user gives a command to write (`export --out`, `import --out`, `view --export`): an
existing file or a folder's contents are never replaced without --force, a bad path is one line,
and the path is checked before any download or computation. Imported SAEs are checked too:
cfg.json an object whose widths and k match the weights, weights finite."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from flows.cli import app
from sae_core.config import SAEConfig
from sae_core.sae import TopKSAE
from sae_core.sae.export import export_sae
from tests.reliability.conftest import error_line


def saeflow(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def refused(result: Result, *phrases: str) -> str:
    """The one error line of a refused command, holding each of `phrases`."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    line = error_line(result.output)
    for phrase in phrases:
        assert phrase in line, line
    return line


@pytest.fixture
def sae_file(tmp_path):
    path = tmp_path / "sae.safetensors"
    TopKSAE(
        16, SAEConfig(n_latents=64, k=4), generator=torch.Generator().manual_seed(0)
    ).save_safetensors(path)
    return path


@pytest.fixture
def saelens_folder(tmp_path, sae_file):
    folder = tmp_path / "saelens"
    export_sae(TopKSAE.load_safetensors(sae_file), folder, "saelens")
    return folder


# export --------------------------------------------------------------------------------------
def test_export_into_a_folder_holding_files_is_refused_then_forced(tmp_path, sae_file):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "cfg.json").write_text("my own settings")
    refused(
        saeflow("export", str(sae_file), "-f", "saelens", "--out", str(out)),
        "not empty (cfg.json)",
        "--force",
    )
    assert (out / "cfg.json").read_text() == "my own settings"
    assert not (out / "sae_weights.safetensors").exists()
    forced = saeflow("export", str(sae_file), "-f", "saelens", "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "cfg.json").read_text())["d_sae"] == 64


def test_export_onto_an_existing_file_is_one_line(tmp_path, sae_file):
    out = tmp_path / "a-file"
    out.write_text("keep me")
    refused(saeflow("export", str(sae_file), "-f", "saelens", "--out", str(out)), "a file is there")
    refused(
        saeflow("export", str(sae_file), "-f", "saelens", "--out", str(out / "below")), "is a file"
    )
    assert out.read_text() == "keep me"


def test_export_checks_its_format_and_folder_before_any_download(tmp_path):
    # An unreachable registry: any download attempt would fail on it, not on the flags.
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}
    result = CliRunner().invoke(
        app, ["export", "models:/some-sae/1", "-f", "onnx", "--out", str(tmp_path / "x")], env=env
    )
    refused(result, "export format 'onnx'")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "index.html").write_text("mine")
    result = CliRunner().invoke(
        app,
        ["export", "models:/some-sae/1", "-f", "saelens", "--out", str(tmp_path / "full")],
        env=env,
    )
    refused(result, "--out", "not empty")


# import --------------------------------------------------------------------------------------
def test_import_onto_an_existing_file_is_refused_then_forced(tmp_path, saelens_folder):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"my own weights")
    refused(saeflow("import", str(saelens_folder), "--out", str(out)), "the file exists", "--force")
    assert out.read_bytes() == b"my own weights"
    forced = saeflow("import", str(saelens_folder), "--out", str(out), "--force")
    assert forced.exit_code == 0, forced.output
    assert TopKSAE.load_safetensors(out).n_latents == 64


def test_import_into_a_missing_folder_or_onto_a_folder_is_one_line(tmp_path, saelens_folder):
    refused(
        saeflow("import", str(saelens_folder), "--out", str(tmp_path / "no" / "x.safetensors")),
        "there is no folder",
    )
    refused(saeflow("import", str(saelens_folder), "--out", str(tmp_path)), "a folder is there")
    refused(
        saeflow("import", str(saelens_folder), "--out", str(tmp_path), "--force"),
        "a folder is there",
    )


def _cfg(change):
    """Rewrite an exported saelens folder's cfg.json: `change(dict) -> JSON value`."""

    def edit(folder):
        cfg = json.loads((folder / "cfg.json").read_text())
        (folder / "cfg.json").write_text(json.dumps(change(cfg)))

    return edit


def _foreign(change):
    """cfg.json as another tool writes it (no saeflow entry), then `change` applied."""
    return _cfg(lambda c: change({k: v for k, v in c.items() if k != "saeflow"}))


def _tensors(change):
    """Rewrite an exported saelens folder's weights: `change(dict) -> dict`."""

    def edit(folder):
        weights = folder / "sae_weights.safetensors"
        save_file(change(load_file(weights)), weights)

    return edit


def _not_json(folder):
    (folder / "cfg.json").write_text("{not json")


def _nan_at_0(name):
    def change(t):
        t[name][0] = float("nan")
        return t

    return _tensors(change)


BAD_IMPORTS = {
    "nan weights": (_nan_at_0("W_dec"), "W_dec holds NaN or infinite"),
    "inf bias": (_tensors(lambda t: {**t, "b_enc": t["b_enc"] / 0}), "b_enc holds NaN or infinite"),
    "cfg.json a list": (_cfg(lambda c: [c]), "holds a JSON list, expected an object"),
    "cfg.json not json": (_not_json, "cfg.json: not JSON"),
    "d_sae lies": (
        _foreign(lambda c: {**c, "d_sae": 999}),
        "d_sae: says 999 but the weights hold 64",
    ),
    "d_in lies": (_cfg(lambda c: {**c, "d_in": 8}), "d_in: says 8 but the weights hold 16"),
    "k 0": (_foreign(lambda c: {**c, "k": 0}), "k: 0 is not a valid k"),
    "k above n": (_foreign(lambda c: {**c, "k": 65}), "k: 65 is not a valid k"),
    "k missing": (_foreign(lambda c: {k: v for k, v in c.items() if k != "k"}), "k: missing"),
    "W_dec shape": (
        _tensors(lambda t: {**t, "W_dec": t["W_dec"][:10].contiguous()}),
        "tensor W_dec has shape [10, 16], expected [64, 16]",
    ),
    "b_dec missing": (
        _tensors(lambda t: {k: v for k, v in t.items() if k != "b_dec"}),
        "no tensor b_dec",
    ),
    "metadata a string": (
        _foreign(lambda c: {**c, "metadata": "x"}),
        "metadata: expected an object",
    ),
    "saeflow entry broken": (
        _cfg(lambda c: {**c, "saeflow": {"normalization": 1}}),
        "saeflow: unreadable",
    ),
}


@pytest.mark.parametrize("case", BAD_IMPORTS)
def test_a_bad_imported_sae_is_refused_in_one_line(tmp_path, saelens_folder, case):
    edit, phrase = BAD_IMPORTS[case]
    edit(saelens_folder)
    out = tmp_path / "imported.safetensors"
    refused(saeflow("import", str(saelens_folder), "--out", str(out)), phrase)
    assert not out.exists()


# view --export -------------------------------------------------------------------------------
def test_view_export_into_a_folder_holding_files_is_refused_before_any_work(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("my page")
    # The target does not exist: had the folder not been checked first, this would be the error.
    refused(
        saeflow("view", "no-such-sae@champion", "--export", str(site)),
        "--export",
        "not empty (index.html)",
        "--force",
    )
    assert (site / "index.html").read_text() == "my page"
    refused(
        saeflow("view", "no-such-sae@champion", "--export", str(site / "index.html")),
        "a file is there",
    )
