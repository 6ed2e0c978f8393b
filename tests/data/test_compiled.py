"""model.compile: the compiled forward gives run_to_hooks's activations, for every batch size,
and refuses what it cannot compile."""

from __future__ import annotations

import pytest
import torch

from sae_core.data.compiled import CompiledForward
from sae_core.data.models import decoder_layers, run_to_hooks
from sae_core.errors import ConfigError
from tests.helpers.tiny_models import build_tiny_llama


@pytest.fixture(scope="module")
def llama():
    return build_tiny_llama()


def test_compiled_forward_equals_the_eager_hook_for_full_and_short_batches(llama):
    forward = CompiledForward(llama, ["resid_post.2"], batch_rows=4)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = forward(ids)[0]
        short = forward(ids[:3])[0]  # padded to 4 rows inside, the same compiled graph
        eager = run_to_hooks(llama, ids, ["resid_post.2"])[0]
    assert full.shape == eager.shape == (4, 16, 64)
    assert short.shape == (3, 16, 64)
    torch.testing.assert_close(full, eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(short, eager[:3], rtol=1e-4, atol=1e-4)
    # The hook's block, not the last one: the trunk stopped at layer 2 and skipped the final norm.
    deeper = run_to_hooks(llama, ids, ["resid_post.3"])[0]
    assert not torch.allclose(full, deeper, atol=1e-3)
    assert len(decoder_layers(llama)) == 4  # the model itself keeps all its blocks


def test_compiled_forward_refuses_other_hooks_and_oversized_batches(llama):
    with pytest.raises(ConfigError, match="model.compile.*resid_post"):
        CompiledForward(llama, ["mlp_out.1"], batch_rows=4)
    with pytest.raises(ConfigError, match="model.compile"):
        CompiledForward(llama, ["resid_post.1", "resid_post.2"], batch_rows=4)
    forward = CompiledForward(llama, ["resid_post.1"], batch_rows=2)
    with pytest.raises(ValueError, match="more than 2"):
        forward(torch.zeros(3, 8, dtype=torch.long))


def test_the_stage_extracts_through_the_compiled_forward_to_its_own_address(
    tiny_llama_dir, tiny_corpus_dir, tmp_path
):
    from sae_core.stages.extract import extract_activations, release_shard_model
    from sae_core.stages.sample import sample_tokens
    from sae_core.storage.loader import iter_batches
    from sae_core.storage.manifests import ActivationsManifest
    from tests.helpers.pipeline import tiny_config

    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, str(tmp_path / "store"))
    tokens = sample_tokens(config.store, config.model, config.data, progress=False)
    eager = extract_activations(tokens, config.model, config.data, progress=False)
    compiled_model = config.model.model_copy(update={"compile": True})
    try:
        compiled = extract_activations(tokens, compiled_model, config.data, progress=False)
    finally:
        release_shard_model()
    assert compiled.fingerprint != eager.fingerprint
    for split in ("train", "eval"):
        rows = eager.manifest(ActivationsManifest).splits[split].rows
        a = next(iter_batches(eager, split, rows, seed=0))
        b = next(iter_batches(compiled, split, rows, seed=0))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
