"""The `saebench` stage on the tiny model: computed once, then reused from the store; its
sections switch off; a transcoder is scored on its output hook without absorption; a bad
setting is one line."""

from __future__ import annotations

import pytest

from sae_core.config import load_config
from sae_core.errors import ConfigError
from sae_core.stages import evaluate as evaluate_stage
from sae_core.stages import saebench as saebench_stage
from sae_core.stages import sample as sample_stage
from sae_core.stages.evaluate import locate_baseline
from sae_core.storage.manifests import SaeBenchManifest
from sae_core.storage.refs import DatasetRef
from tests.helpers.tiny_sae import tiny_sae, tiny_transcoder

SMALL = {"absorption_words": 60, "icl_examples": 2, "min_letters": 1, "decoder_sample": 100}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama_dir, tiny_corpus_dir):
    return tiny_sae(tmp_path_factory.mktemp("store"), tiny_llama_dir, tiny_corpus_dir)


def _tokens_of(trained) -> DatasetRef:
    """The tokens the SAE's data came from (content-addressed: found, not made again)."""
    config, sae = trained
    return sample_stage.sample_tokens(sae.store, config.model, config.data, progress=False)


@pytest.mark.slow
def test_the_stage_computes_once_and_reuses_its_output(trained):
    config, sae = trained
    tokens = _tokens_of(trained)
    cfg = config.saebench.model_copy(update=SMALL)
    args = (sae, tokens, config.model, config.data, config.eval, cfg)
    ref, metrics = saebench_stage.saebench_sae(*args, progress=False)
    assert {"explained_variance", "cossim", "l2_ratio", "alive_fraction",
            "mean_max_decoder_cosine", "absorption_letters",
            "sparse_probe_acc_k1", "sparse_probe_acc_k20"} <= set(metrics)  # fmt: skip
    assert 0 < metrics["alive_fraction"] <= 1 and metrics["decoder_cosine_sample"] == 100
    assert locate_baseline(tokens, config.model, config.data).is_committed()
    assert saebench_stage.locate_letter_set(sae.store, config.model, cfg).is_committed()
    again_ref, again = saebench_stage.saebench_sae(*args, progress=False)
    assert again_ref == ref and again == metrics
    # Sections off: no sparse probes, no absorption; another address.
    off = cfg.model_copy(update={"sparse_probe_ks": [], "absorption_words": 0})
    off_ref, off_metrics = saebench_stage.saebench_sae(*args[:-1], off, progress=False)
    assert off_ref != ref
    assert not any(k.startswith(("sparse_probe", "absorption")) for k in off_metrics)
    assert off_metrics["explained_variance"] == metrics["explained_variance"]


@pytest.mark.slow
def test_a_transcoder_is_scored_on_its_output_hook_and_skips_absorption(
    tmp_path_factory, tiny_llama_dir, tiny_corpus_dir
):
    store = tmp_path_factory.mktemp("tc-store")
    config, tc = tiny_transcoder(store, tiny_llama_dir, tiny_corpus_dir)
    tokens = sample_stage.sample_tokens(tc.store, config.model, config.data, progress=False)
    cfg = config.saebench.model_copy(update=SMALL)
    args = (tc, tokens, config.model, config.data, config.eval, cfg)
    ref, metrics = saebench_stage.saebench_sae(*args, progress=False)
    assert {"explained_variance", "cossim", "l2_ratio", "alive_fraction", "latents_over_1pct",
            "mean_max_decoder_cosine", "sparse_probe_acc_k1"} <= set(metrics)  # fmt: skip
    assert not any(k.startswith("absorption") for k in metrics)
    manifest = ref.manifest(SaeBenchManifest)
    assert manifest.skipped == {"absorption": saebench_stage.ABSORPTION_SKIPPED}
    assert manifest.letter_set is None
    # Scored on y: the evaluation's baseline at the output hook, and its fvu of y agrees.
    at_out = config.model.model_copy(update={"hook": config.model.hook_out})
    assert manifest.baseline == locate_baseline(tokens, at_out, config.data).ref().uri
    plain = config.eval.model_copy(update={"ablation_samples": 0, "probe_contexts": 0})
    _, evaluated = evaluate_stage.evaluate_sae(
        tc, tokens, config.model, config.data, plain, progress=False
    )
    assert metrics["explained_variance"] == pytest.approx(1 - evaluated["fvu"], rel=1e-5)
    again_ref, again = saebench_stage.saebench_sae(*args, progress=False)
    assert again_ref == ref and again == metrics


def test_repeated_sparse_probe_ks_are_one_line():
    with pytest.raises(ConfigError, match="saebench.sparse_probe_ks"):
        load_config("demo", ["saebench.sparse_probe_ks=[1,1]"])
