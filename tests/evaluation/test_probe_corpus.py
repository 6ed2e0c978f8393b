"""eval.probe_corpus: the probe tasks from a labelled corpus other than data.corpus; unset, every
address is the one made before the field existed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sae_core.config import EvalConfig, load_config
from sae_core.errors import ConfigError
from sae_core.evaluation.splice import SplitModel
from sae_core.stages import evaluate as evaluate_stage
from sae_core.stages import saebench as saebench_stage
from sae_core.stages.location import hook_identity, located
from sae_core.storage.manifests import ProbeSetManifest
from sae_core.storage.refs import DatasetRef
from tests.helpers.pipeline import tiny_config
from tests.helpers.tiny_models import build_tokenizer, generated_text

# EvalConfig's fields before eval.probe_corpus, at their defaults: the evaluation's address input.
EVAL_BEFORE = {"batch_contexts": 16, "ablation_samples": 128, "ablation_horizon": 16,
               "probe_contexts": 512, "probe_tokens": 8192, "seed": 0}  # fmt: skip


def _ref(stage: str, fingerprint: str, store: str) -> DatasetRef:
    return DatasetRef(store=store, path=f"{stage}/{fingerprint}", fingerprint=fingerprint, rows=1)


def _write_jsonl(folder: Path, docs: list[dict]) -> Path:
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return folder


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Unlabelled text (`plain`) and a labelled corpus whose text sits in `body` (`labelled`)."""
    import random

    rng, root = random.Random(1), tmp_path_factory.mktemp("corpora")
    plain = [{"text": generated_text(rng, 40)} for _ in range(20)]
    labelled = [
        {"body": generated_text(rng, 40), "genre": ["poetry", "law"][i % 2]} for i in range(20)
    ]
    return {
        "plain": _write_jsonl(root / "plain", plain),
        "labelled": _write_jsonl(root / "labelled", labelled),
    }


def _config(tiny_llama_dir, corpora, store, **eval_fields):
    config = tiny_config(tiny_llama_dir, corpora["plain"], str(store))
    small = {"probe_contexts": 24, "probe_tokens": 200, "batch_contexts": 8}
    return config.model_copy(update={"eval": EvalConfig(**small | eval_fields)})


def test_without_a_probe_corpus_every_address_is_as_before(tiny_llama_dir, tiny_corpus_dir):
    config = tiny_config(tiny_llama_dir, tiny_corpus_dir, "/tmp/unused-store")
    model, data, eval = config.model, config.data, config.eval
    sae, tokens = _ref("sae", "ab" * 8, "/s"), _ref("tokens", "cd" * 8, "/s")
    data_fields = data.model_dump(include=evaluate_stage.PROBE_DATA_FIELDS)
    assert evaluate_stage.locate_evaluation(sae, tokens, model, data, eval) == located(
        "eval", "/s", sae.fingerprint, tokens.fingerprint, *hook_identity(model), data_fields,
        EVAL_BEFORE, code=evaluate_stage.EVAL_CODE,
    )  # fmt: skip
    assert evaluate_stage.probe_inputs(data, eval) == data_fields
    assert evaluate_stage.probe_source(data, eval) is data
    # Named, the probe corpus moves the probe set's, the evaluation's and SAEBench's addresses.
    named = eval.model_copy(update={"probe_corpus": str(tiny_corpus_dir / "part-0.jsonl")})
    for locate, args in (
        (evaluate_stage.locate_probe_set, ("/s", model, data)),
        (evaluate_stage.locate_evaluation, (sae, tokens, model, data)),
        (saebench_stage.locate_saebench, (sae, tokens, model, data)),
    ):
        extra = (config.saebench,) if locate is saebench_stage.locate_saebench else ()
        assert locate(*args, eval, *extra) != locate(*args, named, *extra)


def test_the_probe_set_comes_from_the_named_corpus(tiny_llama_dir, corpora, tmp_path):
    from transformers import AutoModelForCausalLM

    split = SplitModel(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "resid_post.2")
    store = str(tmp_path / "store")
    # data.corpus alone has no labels: a probe set of no contexts, recorded as such.
    unlabelled = _config(tiny_llama_dir, corpora, store)
    ref, probe_set = evaluate_stage.prepare_probe_set(
        store, unlabelled.model, unlabelled.data, unlabelled.eval, split, build_tokenizer(),
        progress=False,
    )  # fmt: skip
    assert probe_set is None and ref.rows == 0
    # Named, with its own text column: genres from it, the manifest naming it.
    named = str(corpora["labelled"])
    config = _config(tiny_llama_dir, corpora, store, probe_corpus=named, probe_text_column="body")
    evaluate_stage.check_probe_corpus(config.data, config.eval)
    ref, probe_set = evaluate_stage.prepare_probe_set(
        store, config.model, config.data, config.eval, split, build_tokenizer(), progress=False
    )
    assert probe_set.genres == ["law", "poetry"] and probe_set.acts.shape[0] == ref.rows == 24
    manifest = ref.manifest(ProbeSetManifest)
    assert manifest.corpus == named and manifest.genres == ["law", "poetry"]


@pytest.mark.parametrize(
    "fields, needles",
    [
        ({"probe_corpus": "no-such-corpus"}, ["eval.probe_corpus 'no-such-corpus'", "brown"]),
        ({"probe_corpus": "plain"}, ["eval.probe_corpus", "no labels"]),
        ({"probe_corpus": "labelled"}, ["eval.probe_text_column 'text'", "body"]),
    ],
)
def test_an_unusable_probe_corpus_is_one_line_naming_eval(
    tiny_llama_dir, corpora, tmp_path, fields, needles
):
    fields = {k: str(corpora.get(v, v)) for k, v in fields.items()}
    config = _config(tiny_llama_dir, corpora, tmp_path, **fields)
    with pytest.raises(ConfigError) as err:
        evaluate_stage.check_probe_corpus(config.data, config.eval)
    assert all(needle in str(err.value) for needle in needles), str(err.value)
    assert "data.corpus" not in str(err.value) and "\n" not in str(err.value)


def test_a_text_column_without_a_probe_corpus_is_refused():
    with pytest.raises(ConfigError, match="eval.probe_text_column applies to eval.probe_corpus"):
        load_config("tiny", ["eval.probe_text_column=body"])


def test_the_research_preset_probes_on_brown():
    config = load_config("research")
    assert (config.data.corpus, config.eval.probe_corpus) == ("english", "brown")
    assert config.eval.probe_contexts > 0
