"""Stage `eval`: a trained SAE spliced into the model on the eval split (sae_core.evaluation),
with the two inputs it shares between SAEs: the eval set's `baseline` (the model cut at the
hook, its clean and ablated losses) and the `probes` set (labelled contexts and their
activations), each computed once and reused from the store."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sae_core.config import PROBE_CORPUS_FIELDS, DataConfig, EvalConfig, ModelConfig
from sae_core.data import models, tokens
from sae_core.data.activations import first_position
from sae_core.data.assets import DEMO_CORPORA, resolve_corpus, resolve_model_path
from sae_core.data.models import HookPoint, check_transcoder_hooks, load_model
from sae_core.data.tokens import check_text_column, load_corpus
from sae_core.errors import ConfigError
from sae_core.evaluation import (
    ablation,
    baseline,
    evaluate,
    metrics,
    probe_data,
    probes,
    splice,
    transcode,
)
from sae_core.evaluation.splice import SplitModel
from sae_core.sae import SparseAutoencoder, TranscoderSAE, load_sae
from sae_core.stages.location import Location, corpus_identity, hook_identity, located
from sae_core.storage.manifests import (
    BaselineManifest,
    EvaluationManifest,
    ProbeSetManifest,
    SaeManifest,
)
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

BASELINE_CODE = (baseline, splice, models, metrics)
PROBE_CODE = (probe_data, splice, models, tokens)
EVAL_CODE = (evaluate, metrics, models, splice, baseline, ablation, probes, probe_data, transcode)


def locate_baseline(tokens: DatasetRef, model: ModelConfig, data: DataConfig) -> Location:
    return located(
        "baseline",
        tokens.store,
        tokens.fingerprint,
        *hook_identity(model),
        data.skip_first_position,
        code=BASELINE_CODE,
    )


def prepare_baseline(
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    split: SplitModel,
    progress: bool = True,
) -> tuple[DatasetRef, Any]:
    """The eval set's part below the hook and its zero/mean-ablation CE: (ref, Baseline).

    split: the model cut at the hook."""

    loc = locate_baseline(tokens, model, data)
    store = Store(tokens.store)
    if (manifest := loc.committed(BaselineManifest)) is not None:
        data_bytes = store.read_bytes(f"{loc.path}/{baseline.FILE}")
        stored = baseline.baseline_from(data_bytes, manifest.ce_sums, manifest.terms)
        return loc.ref(manifest.contexts), stored
    contexts = evaluate.load_eval_contexts(tokens)
    result = baseline.compute_baseline(
        split, contexts, eval.batch_contexts, first_position(data), progress
    )
    with store.writing(loc.path) as writer:
        writer.write_bytes(baseline.FILE, baseline.baseline_bytes(result))
        writer.manifest = BaselineManifest(
            fingerprint=loc.fingerprint,
            tokens=tokens.uri,
            hook=model.hook,
            contexts=contexts.shape[0],
            ce_sums=result.ce_sums,
            terms=result.terms,
        )
    return loc.ref(contexts.shape[0]), result


PROBE_DATA_FIELDS = {"corpus", "text_column", "context_len", "skip_first_position"}
PROBE_EVAL_FIELDS = {"probe_contexts", "probe_tokens", "seed"}


def probe_source(data: DataConfig, eval: EvalConfig) -> DataConfig:
    """The data section the probe tasks read: `data` itself, or with eval.probe_corpus and
    eval.probe_text_column in place of its corpus and text column."""
    if eval.probe_corpus is None:
        return data
    return data.model_copy(
        update={"corpus": eval.probe_corpus, "text_column": eval.probe_text_column}
    )


def probe_inputs(data: DataConfig, eval: EvalConfig) -> dict[str, Any]:
    """The probe corpus and contexts as an input of a stage's address (without
    eval.probe_corpus: data's fields, as before that field existed)."""
    return probe_source(data, eval).model_dump(include=PROBE_DATA_FIELDS)


@contextmanager
def _probe_corpus_errors(eval: EvalConfig) -> Iterator[None]:
    """The corpus loaders' errors name data's fields, which they usually read; for
    eval.probe_corpus they name eval's."""
    if eval.probe_corpus is None:
        yield
        return
    try:
        yield
    except ConfigError as err:
        text = str(err).replace("data.corpus", "eval.probe_corpus")
        raise ConfigError(text.replace("data.text_column", "eval.probe_text_column")) from None


def load_probe_corpus(data: DataConfig, eval: EvalConfig, cache_dir: str) -> Any:
    """The probe corpus as a `datasets.Dataset`; eval.probe_corpus must carry labels and
    eval.probe_text_column (ConfigError naming the field), data.corpus may lack labels."""
    source = probe_source(data, eval)
    with _probe_corpus_errors(eval):
        files = resolve_corpus(source.corpus)
        try:
            corpus = load_corpus(files, cache_dir)
        except ConfigError:
            named = eval.probe_corpus
            if named is None or named in DEMO_CORPORA or Path(named).expanduser().exists():
                raise
            raise ConfigError(  # a name neither demo nor local: the loader tried the hub
                f"eval.probe_corpus '{eval.probe_corpus}': not a demo corpus "
                f"({', '.join(sorted(DEMO_CORPORA))}) nor a local file or folder, and no hub "
                "dataset of that name loads (offline: it must be cached); e.g. "
                "eval.probe_corpus=brown"
            ) from None
        if eval.probe_corpus is not None:
            check_text_column(corpus, source)
    if eval.probe_corpus is not None and not probe_data.has_labels(corpus):
        raise ConfigError(
            f"eval.probe_corpus '{eval.probe_corpus}': no labels to probe for (a genre column, "
            "or tags and spans); choose a labelled corpus such as brown, or set "
            "eval.probe_contexts=0"
        )
    return corpus


def check_probe_corpus(data: DataConfig, eval: EvalConfig) -> None:
    """eval.probe_corpus loads and carries labels: checked before training, whose hours an
    unusable probe corpus would otherwise follow (data.corpus has preflight's checks)."""
    if eval.probe_contexts and eval.probe_corpus is not None:
        with tempfile.TemporaryDirectory(prefix="saeflow-datasets-") as cache_dir:
            load_probe_corpus(data, eval, cache_dir)


def locate_probe_set(
    store: str, model: ModelConfig, data: DataConfig, eval: EvalConfig
) -> Location:
    return located(
        "probes",
        store,
        corpus_identity(probe_source(data, eval).corpus),
        probe_inputs(data, eval),
        eval.model_dump(include=PROBE_EVAL_FIELDS),
        *hook_identity(model),
        code=PROBE_CODE,
    )


def prepare_probe_set(
    store: str,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    split: SplitModel,
    tokenizer: Any,
    progress: bool = True,
) -> tuple[DatasetRef, Any]:
    """Probe contexts, labels and activations at the hook: (ref, ProbeSet), or (ref, None)
    when the corpus carries no labels (recorded, so the corpus is not read again)."""

    loc = locate_probe_set(store, model, data, eval)
    st = Store(store)
    if (manifest := loc.committed(ProbeSetManifest)) is not None:
        if not manifest.contexts:
            return loc.ref(0), None
        data_bytes = st.read_bytes(f"{loc.path}/{probe_data.FILE}")
        return loc.ref(manifest.contexts), probe_data.probe_set_from(data_bytes, manifest.genres)
    result = None
    source = probe_source(data, eval)
    with tempfile.TemporaryDirectory(prefix="saeflow-datasets-") as cache_dir:
        corpus = load_probe_corpus(data, eval, cache_dir)
        if probe_data.has_labels(corpus):
            result = probe_data.build_probe_set(
                split,
                corpus,
                source.text_column,
                tokenizer,
                data.context_len,
                first_position(data),
                eval.probe_contexts,
                eval.probe_tokens,
                eval.batch_contexts,
                eval.seed,
                progress,
            )
    contexts = 0 if result is None else int(result.acts.shape[0])
    with st.writing(loc.path) as writer:
        if result is not None:
            writer.write_bytes(probe_data.FILE, probe_data.probe_set_bytes(result))
        writer.manifest = ProbeSetManifest(
            fingerprint=loc.fingerprint,
            corpus=source.corpus,
            hook=model.hook,
            contexts=contexts,
            token_sample=0 if result is None else int(result.token_sample.shape[0]),
            genres=[] if result is None else result.genres,
            pos_classes=list(probe_data.POS_CLASSES),
        )
    return loc.ref(contexts), result


def locate_evaluation(
    sae: DatasetRef, tokens: DatasetRef, model: ModelConfig, data: DataConfig, eval: EvalConfig
) -> Location:
    return located(
        "eval",
        sae.store,
        sae.fingerprint,
        tokens.fingerprint,
        *hook_identity(model),
        probe_inputs(data, eval),
        eval.model_dump(mode="json", exclude=PROBE_CORPUS_FIELDS),
        code=EVAL_CODE,
    )


def remove_evaluation(
    sae: DatasetRef, tokens: DatasetRef, model: ModelConfig, data: DataConfig, eval: EvalConfig
) -> None:
    """Delete the evaluation and the baseline and probe set it used: the next run makes all
    three afresh."""
    locate_evaluation(sae, tokens, model, data, eval).remove()
    locate_baseline(tokens, model, data).remove()
    locate_probe_set(tokens.store, model, data, eval).remove()


def _check_eval(data: DataConfig, eval: EvalConfig) -> None:
    room = data.context_len - first_position(data)
    if eval.ablation_samples and eval.ablation_horizon > room:
        raise ConfigError(
            f"eval.ablation_horizon={eval.ablation_horizon} exceeds the {room} scored positions "
            f"of a context (data.context_len={data.context_len}); lower it or set eval.ablation_samples=0"
        )


def transcoder_input(sae: SparseAutoencoder, model: ModelConfig) -> HookPoint | None:
    """A transcoder's input hook (model.hook), checked against its output hook; None for an SAE."""
    if not isinstance(sae, TranscoderSAE):
        return None
    if model.hook_out is None:
        raise ConfigError(
            f"sae.kind={sae.cfg.kind}: evaluating a transcoder needs model.hook_out, the hook "
            "it was trained to reconstruct"
        )
    check_transcoder_hooks(model.hook, model.hook_out)
    return HookPoint.parse(model.hook)


def spliced_model(model: ModelConfig, transcoder: bool) -> ModelConfig:
    """`model` at the hook whose activation the SAE's output replaces: model.hook_out for a
    transcoder (its eval set's baseline is that hook's), model.hook for an SAE."""
    return model.model_copy(update={"hook": model.hook_out}) if transcoder else model


def evaluate_sae(
    sae: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    progress: bool = True,
) -> tuple[DatasetRef, dict[str, float]]:
    """Evaluate a trained SAE; the eval set's baseline and the probe set are prepared (or
    reused from the store) on the way."""

    loc = locate_evaluation(sae, tokens, model, data, eval)
    if (manifest := loc.committed(EvaluationManifest)) is None:
        _check_eval(data, eval)
        started = time.perf_counter()
        loaded = load_model(resolve_model_path(model.path), model.dtype, model.device)
        trained = load_sae(sae)
        # A transcoder is spliced at its output hook; its latents (probes) read its input hook.
        hook_in = transcoder_input(trained, model)
        spliced = spliced_model(model, hook_in is not None)
        split = SplitModel(loaded.model, spliced.hook)
        seconds = {"load model": time.perf_counter() - started}
        start = time.perf_counter()
        base_ref, base = prepare_baseline(tokens, spliced, data, eval, split, progress)
        seconds["baseline (once per eval set)"] = time.perf_counter() - start
        probe_ref, probe_set = None, None
        if eval.probe_contexts:
            start = time.perf_counter()
            probe_split = split if hook_in is None else SplitModel(loaded.model, model.hook)
            probe_ref, probe_set = prepare_probe_set(
                tokens.store, model, data, eval, probe_split, loaded.tokenizer, progress
            )
            seconds["probe set (once per corpus)"] = time.perf_counter() - start
        result = evaluate.evaluate_sae(
            trained,
            split,
            evaluate.load_eval_contexts(tokens),
            base,
            eval,
            first_position(data),
            probe_set,
            progress,
            hook_in,
        )
        seconds |= result.seconds
        seconds["total"] = time.perf_counter() - started
        sae_manifest = sae.manifest(SaeManifest)
        with Store(sae.store).writing(loc.path) as writer:
            writer.write_json("latent_fire_counts.json", result.latent_fire_counts)
            writer.write_json("density_histogram.json", result.density._asdict())
            writer.write_json("probes.json", [p._asdict() for p in result.probes])
            writer.write_json("ablation_sparsity.json", result.ablation_sparsity)
            manifest = EvaluationManifest(
                fingerprint=loc.fingerprint,
                sae=sae.uri,
                n_latents=sae_manifest.n,
                k=sae_manifest.k,
                tokens=tokens.uri,
                baseline=base_ref.uri,
                probe_set=probe_ref.uri if probe_ref else None,
                metrics=result.metrics,
                seconds=seconds,
            )
            writer.manifest = manifest
    return loc.ref(int(manifest.metrics["eval_tokens"])), manifest.metrics
