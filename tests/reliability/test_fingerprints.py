"""Honest fingerprints: a model is named by its content at any size, so new weights under the
same name, size and mtime recompute every stage that depends on them; `--refresh STAGE`
recomputes a stage and what reads it; one SAE address always holds the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sae_core.config import ModelConfig
from sae_core.stages.location import model_identity
from sae_core.storage.store import Store
from tests.helpers.pipeline import ALL_STAGES, run, tiny_config
from tests.helpers.tiny_models import build_tiny_llama, build_tokenizer

BIG = 17 * 2**20  # above the 16 MiB up to which content used to count


def _rewrite_in_place(path, at: int, data: bytes) -> None:
    """New bytes at `at`, same inode, size and mtime (as `cp -p` of same-shape weights leaves)."""
    stat = path.stat()
    with open(path, "r+b") as fh:
        fh.seek(at)
        fh.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def test_new_content_in_a_large_weights_file_changes_the_models_identity(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with open(model / "model.safetensors", "wb") as fh:
        fh.truncate(BIG)
    config = ModelConfig(path=str(model), hook="resid_post.0")
    before = model_identity(config)
    _rewrite_in_place(model / "model.safetensors", BIG // 2, b"\x01")
    assert model_identity(config) != before


@pytest.fixture(scope="module")
def big_llama_dir(tmp_path_factory):
    """The tiny Llama with a 65,536-token vocabulary: its weights file is 33 MiB."""
    folder = tmp_path_factory.mktemp("big-llama")
    tokenizer = build_tokenizer()
    build_tiny_llama(vocab_size=2**16, eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size > BIG
    return folder


@pytest.fixture(scope="module")
def first_run(prefect, big_llama_dir, tiny_corpus_dir, tmp_path_factory):
    config = tiny_config(big_llama_dir, tiny_corpus_dir, str(tmp_path_factory.mktemp("store")))
    result = run(config)
    assert set(result.stages.values()) == {"computed"}
    return config, result


def _replace_weights_in_place(folder) -> None:
    """Same-shape weights with other values written over the model's file."""
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    stat = weights.stat()
    tensors = load_file(weights)
    tensors = {k: v * 1.5 if ".mlp." in k else v for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size


def test_replaced_weights_recompute_extraction_and_everything_after(first_run, big_llama_dir):
    config, result = first_run
    _replace_weights_in_place(big_llama_dir)
    again = run(config)
    assert {s: again.stages[s] for s in ALL_STAGES[1:]} == dict.fromkeys(ALL_STAGES[1:], "computed")
    assert again.activations.path != result.activations.path
    assert again.sae.path != result.sae.path
    assert int(again.registry.version) == int(result.registry.version) + 1


def test_refresh_recomputes_the_stage_and_what_reads_it(first_run):
    config, _ = first_run
    before = run(config)
    store = Store(before.sae.store)
    sae_bytes = store.read_bytes(f"{before.sae.path}/sae.safetensors")
    refreshed = run(config, refresh=["train_sae"])
    recomputed = [
        "train_sae", "evaluate_sae", "saebench_sae", "register_model", "latent_stats",
        "report_run",
    ]  # fmt: skip
    assert refreshed.stages == {s: "computed" if s in recomputed else "cached" for s in ALL_STAGES}
    assert refreshed.sae == before.sae  # the same address, holding the same bytes
    assert store.read_bytes(f"{before.sae.path}/sae.safetensors") == sae_bytes
    assert int(refreshed.registry.version) == int(before.registry.version) + 1
    assert set(run(config).stages.values()) == {"cached"}  # the refreshed outputs are cached


def test_an_sae_file_is_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders its metadata keys by a per-process hash seed; saeflow sorts them."""
    script = (
        "import sys, torch\n"
        "from sae_core.config import SAEConfig\n"
        "from sae_core.sae import build_sae\n"
        "torch.manual_seed(0)\n"
        "sys.stdout.buffer.write(build_sae(16, SAEConfig(n_latents=32, k=4)).to_bytes())\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, check=True).stdout
        for _ in range(4)
    }
    assert len(outputs) == 1
