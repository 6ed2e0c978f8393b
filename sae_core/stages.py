"""The pipeline's stages as plain functions over the store, each idempotent.

Every stage names its output folder by a fingerprint of its inputs and of the code that makes
it (`locate_*`), returns the committed dataset when it is already there, and otherwise computes
it inside `Store.writing` (data first, manifest last). Orchestrators wrap these one to one.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, NamedTuple

from sae_core.activations import ShardRange
from sae_core.assets import resolve_corpus, resolve_model_path
from sae_core.config import (
    TRAIN_EXECUTION_FIELDS,
    ConfigError,
    DataConfig,
    EvalConfig,
    LatentsConfig,
    ModelConfig,
    SAEConfig,
    TrainConfig,
)
from sae_core.fingerprint import code_fingerprint, fingerprint, path_fingerprint
from sae_core.refs import DatasetRef
from sae_core.store import PROGRESS, DatasetWriter, Store

if TYPE_CHECKING:  # torch and pyarrow load with the stages that use them
    from sae_core.activations import ShardRange


class Location(NamedTuple):
    """Where a stage's output lives: the store URI, the dataset folder and its fingerprint."""

    store: str
    path: str
    fingerprint: str

    def ref(self, rows: int = 0) -> DatasetRef:
        return DatasetRef(store=self.store, path=self.path, fingerprint=self.fingerprint, rows=rows)

    def committed(self) -> dict[str, Any] | None:
        return Store(self.store).manifest(self.path)


def _located(stage: str, store: str, *inputs: Any, code: tuple[str, ...]) -> Location:
    fp = fingerprint(stage, *inputs, code_fingerprint(*code))
    return Location(store=store, path=f"{stage}/{fp}", fingerprint=fp)


def _model_identity(model: ModelConfig) -> dict[str, Any]:
    path = resolve_model_path(model.path)
    return {"path": model.path, "content": path_fingerprint(path)}


# tokens --------------------------------------------------------------------------------------
_TOKEN_FIELDS = {"corpus", "text_column", "context_len", "train_tokens", "eval_tokens", "seed"}


def locate_tokens(store: str, model: ModelConfig, data: DataConfig) -> Location:
    corpus = resolve_corpus(data.corpus)
    return _located(
        "tokens",
        store,
        data.model_dump(include=_TOKEN_FIELDS),
        path_fingerprint(corpus) if isinstance(corpus, list) else corpus,
        _model_identity(model),  # the tokenizer lives with the model
        code=("sae_core.tokens",),
    )


def sample_tokens(
    store: str, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    from transformers import AutoTokenizer

    from sae_core import tokens

    loc = locate_tokens(store, model, data)
    if (manifest := loc.committed()) is not None:
        return loc.ref(manifest["splits"]["train"]["tokens"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model.path))
    with Store(store).writing(loc.path) as writer:
        manifest = tokens.sample_tokens(
            data, tokenizer, resolve_corpus(data.corpus), writer, progress
        )
        manifest["fingerprint"] = loc.fingerprint
    return loc.ref(manifest["splits"]["train"]["tokens"])


# activations ---------------------------------------------------------------------------------
_ACTIVATION_FIELDS = {
    "skip_first_position",
    "max_norm",
    "batch_tokens",
    "shard_mb",
    "shard_rows",
    "storage_dtype",
}


def locate_activations(tokens: DatasetRef, model: ModelConfig, data: DataConfig) -> Location:
    return _located(
        "activations",
        tokens.store,
        tokens.fingerprint,
        _model_identity(model),
        model.hook,
        model.dtype,
        data.model_dump(include=_ACTIVATION_FIELDS),
        code=("sae_core.activations", "sae_core.models"),
    )


def extract_activations(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, progress: bool = True
) -> DatasetRef:
    return extract_hook_datasets(tokens, model, data, [model.hook], progress)[0]


class ActivationPlan(NamedTuple):
    """What an extraction has left to do: the datasets of `hooks` (each located as if it were
    `model.hook`), which of them are not committed (`todo`), every shard of a split, and the
    shards some `todo` dataset has not marked done (`missing`)."""

    tokens: DatasetRef
    model: ModelConfig
    data: DataConfig
    hooks: list[str]
    locations: list[Location]
    todo: list[int]
    shards: list[ShardRange]
    missing: list[ShardRange]


def plan_activations(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, hooks: list[str]
) -> ActivationPlan:
    """Locate the hooks' datasets and list the shards still to make; reads configs and marks
    only (no weights). Clears what a killed attempt left half-written."""
    from sae_core.activations import check_tokens, plan_shards, storage_dtype
    from sae_core.preflight import inspect_model

    locs = [locate_activations(tokens, model.model_copy(update={"hook": h}), data) for h in hooks]
    store = Store(tokens.store)
    todo = []
    for i, loc in enumerate(locs):
        if loc.committed() is None:
            todo.append(i)
        else:  # marks of an attempt killed between its commit and their removal
            store.rm(f"{loc.path}/{PROGRESS}")
    shards: list[ShardRange] = []
    missing: list[ShardRange] = []
    if todo:
        facts = [inspect_model(model.path, hooks[i]) for i in todo][0]  # checks every hook
        src = check_tokens(tokens, data, facts.vocab_size)
        shards = plan_shards(src, data, facts.width, storage_dtype(model.dtype, data))
        done = []
        for i in todo:
            store.clear_temporaries(locs[i].path)
            writer = DatasetWriter(store, locs[i].path)
            done.append(writer.done_parts("train") | writer.done_parts("eval"))
        missing = [s for s in shards if any(s.part not in d for d in done)]
    return ActivationPlan(tokens, model, data, hooks, locs, todo, shards, missing)


_SHARD_LOCK = threading.Lock()  # one shard at a time per process: hooks live on the shared model


@functools.lru_cache(maxsize=1)
def _shard_model(path: str, dtype: str, device: str) -> Any:
    from sae_core.models import load_model

    return load_model(resolve_model_path(path), dtype, device).model


def release_shard_model() -> None:
    """Free the model `extract_activation_shard` keeps loaded for the next shard."""
    _shard_model.cache_clear()


def extract_activation_shard(plan: ActivationPlan, shard: ShardRange) -> ShardRange:
    """Make `shard` of every `todo` dataset that lacks it. The model is loaded once per process
    and kept for the next shard (`release_shard_model` frees it). Returns the shard."""
    from sae_core.activations import extract_shard

    store = Store(plan.tokens.store)
    writers = [DatasetWriter(store, plan.locations[i].path) for i in plan.todo]
    lacking = [
        (plan.hooks[i], w)
        for i, w in zip(plan.todo, writers, strict=True)
        if not w.is_done(shard.part)
    ]
    if lacking:
        with _SHARD_LOCK:
            model = _shard_model(plan.model.path, plan.model.dtype, plan.model.device)
            extract_shard(
                model,
                plan.tokens,
                shard,
                plan.data,
                [h for h, _ in lacking],
                [w for _, w in lacking],
            )
    return shard


def commit_activations(plan: ActivationPlan) -> list[DatasetRef]:
    """Commit each `todo` dataset (its manifest from the shards' marks, written last); the
    references of every hook's dataset."""
    from sae_core.activations import activation_manifest

    store = Store(plan.tokens.store)
    refs = []
    for i, loc in enumerate(plan.locations):
        if i in plan.todo:
            writer = DatasetWriter(store, loc.path)
            manifest = activation_manifest(
                writer, plan.tokens, plan.data, plan.hooks[i], plan.shards
            )
            manifest["fingerprint"] = loc.fingerprint
            store.commit(loc.path, manifest)
        else:
            manifest = loc.committed()
        refs.append(loc.ref(manifest["splits"]["train"]["rows"]))
    return refs


def extract_hook_datasets(
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    hooks: list[str],
    progress: bool = True,
) -> list[DatasetRef]:
    """One activations dataset per hook (each located as if it were `model.hook`), the missing
    ones from a single pass over the tokens in this process, shard by shard; an interrupted
    pass only makes the shards it had not finished."""
    from tqdm.auto import tqdm

    plan = plan_activations(tokens, model, data, hooks)
    try:
        for shard in tqdm(plan.missing, desc="extract", unit="shard", disable=not progress):
            extract_activation_shard(plan, shard)
    finally:
        release_shard_model()
    return commit_activations(plan)


# training ------------------------------------------------------------------------------------
def locate_sae(acts: DatasetRef, sae: SAEConfig, train: TrainConfig) -> Location:
    return _located(
        "sae",
        acts.store,
        acts.fingerprint,
        sae,
        train.model_dump(exclude=TRAIN_EXECUTION_FIELDS),
        code=(
            "sae_core.train",  # one SAE or a group: the same loop, the same result
            "sae_core.loader",  # the batch order
            "sae_core.ranks",  # the reductions over the global batch
            "sae_core.sae.base",
            "sae_core.sae.topk",
            "sae_core.sae.expander",
            "sae_core.sae.kernels",
            "sae_core.sae.native",
            "sae_core.normalize",
        ),
    )


def train_sae(
    acts: DatasetRef, sae: SAEConfig, train: TrainConfig, progress: bool = True
) -> DatasetRef:
    return train_sae_group(acts, [(sae, train)], progress)[0]


def train_sae_group(
    acts: DatasetRef, points: Sequence[tuple[SAEConfig, TrainConfig]], progress: bool = True
) -> list[DatasetRef]:
    """One committed SAE per (sae, train) point, each at its own `locate_sae` location (the one
    a lone `train_sae` uses). Those not committed yet train together from one read of the data
    (they must share `train.data_order`), each resuming from its checkpoint, then each commits.
    A group whose training state would take more than half the device's memory trains in
    chunks that fit, one read of the data each.
    """
    from sae_core import faults
    from sae_core import train as training
    from sae_core.device import device_memory, pick_device, state_copies

    locs = [locate_sae(acts, sae, train) for sae, train in points]
    manifests = {loc: loc.committed() for loc in locs}  # one entry per distinct location
    configs = dict(zip(locs, points, strict=True))
    todo = [loc for loc, manifest in manifests.items() if manifest is None]
    members = [
        training.GroupMember(*configs[loc], checkpoint_dir=f"checkpoints/{loc.fingerprint}")
        for loc in todo
    ]
    if todo:
        # faults.open_store: SAEFLOW_INJECT_FAULT can fail checkpoint writes, to test re-runs.
        store = faults.open_store(acts.store)
        train0 = members[0].train
        device = pick_device(train0.device)
        budget = device_memory(device) // (2 * state_copies(device, train0.world_size))
        width = int(acts.manifest()["width"])
        for chunk in training.split_by_memory(members, width, budget):
            chunk_locs = [todo[i] for i in chunk]
            chunk_members = [members[i] for i in chunk]
            manifests |= _train_and_commit(acts, store, chunk_locs, chunk_members, progress)
    return [loc.ref(manifests[loc].get("tokens_seen", 0)) for loc in locs]


def _train_and_commit(
    acts: DatasetRef, store: Store, locs: list[Location], members: list[Any], progress: bool
) -> dict[Location, dict[str, Any]]:
    """Train `members` (sae_core.train.GroupMember) as one group, commit each at its location;
    their manifests. The trainers are dropped on return, before another chunk starts. With
    train.world_size > 1 torchrun workers train the group and rank 0 fills the folders."""
    from sae_core import ddp
    from sae_core import train as training

    manifests = {}
    with ExitStack() as stack:  # every folder committed on a normal exit, none on an error
        writers = [stack.enter_context(store.writing(loc.path)) for loc in locs]
        if members[0].train.world_size > 1:
            done = ddp.train_data_parallel(acts, members, [w.dataset for w in writers], progress)
            made = [(trained.manifest, trained.resumed_from_tokens) for trained in done]
        else:
            trainers = training.train_group(acts, members, store, progress)
            made = [
                (training.write_trained(w, acts, t).manifest, t.resumed_from_tokens)
                for w, t in zip(writers, trainers, strict=True)
            ]
        for loc, writer, (manifest, resumed) in zip(locs, writers, made, strict=True):
            writer.manifest = manifest | {
                "fingerprint": loc.fingerprint,
                "resumed_from_tokens": resumed,
            }
            manifests[loc] = writer.manifest
    return manifests


# evaluation ----------------------------------------------------------------------------------
def _first_position(data: DataConfig) -> int:
    return 1 if data.skip_first_position else 0


def locate_baseline(tokens: DatasetRef, model: ModelConfig, data: DataConfig) -> Location:
    return _located(
        "baseline",
        tokens.store,
        tokens.fingerprint,
        _model_identity(model),
        model.hook,
        model.dtype,
        data.skip_first_position,
        code=("sae_core.baseline", "sae_core.splice", "sae_core.models", "sae_core.metrics"),
    )


def prepare_baseline(
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    split: Any,
    progress: bool = True,
) -> tuple[DatasetRef, Any]:
    """The eval set's part below the hook and its zero/mean-ablation CE: (ref, Baseline).

    split: the model cut at the hook (sae_core.splice.SplitModel)."""
    from sae_core import baseline
    from sae_core.evaluate import load_eval_contexts

    loc = locate_baseline(tokens, model, data)
    store = Store(tokens.store)
    if (manifest := loc.committed()) is not None:
        data_bytes = store.read_bytes(f"{loc.path}/{baseline.FILE}")
        return loc.ref(manifest["contexts"]), baseline.baseline_from(data_bytes, manifest)
    contexts = load_eval_contexts(tokens)
    result = baseline.compute_baseline(
        split, contexts, eval.batch_contexts, _first_position(data), progress
    )
    with store.writing(loc.path) as writer:
        writer.write_bytes(baseline.FILE, baseline.baseline_bytes(result))
        writer.manifest = {
            "kind": "baseline",
            "fingerprint": loc.fingerprint,
            "tokens": tokens.uri,
            "hook": model.hook,
            "contexts": contexts.shape[0],
            "ce_sums": result.ce_sums,
            "terms": result.terms,
        }
    return loc.ref(contexts.shape[0]), result


_PROBE_DATA_FIELDS = {"corpus", "text_column", "context_len", "skip_first_position"}
_PROBE_EVAL_FIELDS = {"probe_contexts", "probe_tokens", "seed"}


def locate_probe_set(
    store: str, model: ModelConfig, data: DataConfig, eval: EvalConfig
) -> Location:
    corpus = resolve_corpus(data.corpus)
    return _located(
        "probes",
        store,
        path_fingerprint(corpus) if isinstance(corpus, list) else corpus,
        data.model_dump(include=_PROBE_DATA_FIELDS),
        eval.model_dump(include=_PROBE_EVAL_FIELDS),
        _model_identity(model),
        model.hook,
        model.dtype,
        code=("sae_core.probe_data", "sae_core.splice", "sae_core.models", "sae_core.tokens"),
    )


def prepare_probe_set(
    store: str,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    split: Any,
    tokenizer: Any,
    progress: bool = True,
) -> tuple[DatasetRef, Any]:
    """Probe contexts, labels and activations at the hook: (ref, ProbeSet), or (ref, None)
    when the corpus carries no labels (recorded, so the corpus is not read again)."""
    import tempfile

    from sae_core import probe_data
    from sae_core.tokens import load_corpus

    loc = locate_probe_set(store, model, data, eval)
    st = Store(store)
    if (manifest := loc.committed()) is not None:
        if not manifest["contexts"]:
            return loc.ref(0), None
        data_bytes = st.read_bytes(f"{loc.path}/{probe_data.FILE}")
        return loc.ref(manifest["contexts"]), probe_data.probe_set_from(data_bytes, manifest)
    result = None
    with tempfile.TemporaryDirectory(prefix="saeflow-datasets-") as cache_dir:
        corpus = load_corpus(resolve_corpus(data.corpus), cache_dir)
        if probe_data.has_labels(corpus):
            result = probe_data.build_probe_set(
                split,
                corpus,
                data.text_column,
                tokenizer,
                data.context_len,
                _first_position(data),
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
        writer.manifest = {
            "kind": "probe_set",
            "fingerprint": loc.fingerprint,
            "corpus": data.corpus,
            "hook": model.hook,
            "contexts": contexts,
            "token_sample": 0 if result is None else int(result.token_sample.shape[0]),
            "genres": [] if result is None else result.genres,
            "pos_classes": list(probe_data.POS_CLASSES),
        }
    return loc.ref(contexts), result


_EVAL_CODE = (
    "sae_core.evaluate",
    "sae_core.metrics",
    "sae_core.models",
    "sae_core.splice",
    "sae_core.baseline",
    "sae_core.ablation",
    "sae_core.probes",
    "sae_core.probe_data",
)


def locate_evaluation(
    sae: DatasetRef, tokens: DatasetRef, model: ModelConfig, data: DataConfig, eval: EvalConfig
) -> Location:
    return _located(
        "eval",
        sae.store,
        sae.fingerprint,
        tokens.fingerprint,
        _model_identity(model),
        model.hook,
        model.dtype,
        data.model_dump(include=_PROBE_DATA_FIELDS),
        eval,
        code=_EVAL_CODE,
    )


def _check_eval(data: DataConfig, eval: EvalConfig) -> None:
    room = data.context_len - _first_position(data)
    if eval.ablation_samples and eval.ablation_horizon > room:
        raise ConfigError(
            f"eval.ablation_horizon={eval.ablation_horizon} exceeds the {room} scored positions "
            f"of a context (data.context_len={data.context_len}); lower it or set eval.ablation_samples=0"
        )


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
    import time

    from sae_core import evaluate
    from sae_core.models import load_model
    from sae_core.sae import load_sae
    from sae_core.splice import SplitModel

    loc = locate_evaluation(sae, tokens, model, data, eval)
    if (manifest := loc.committed()) is None:
        _check_eval(data, eval)
        started = time.perf_counter()
        loaded = load_model(resolve_model_path(model.path), model.dtype, model.device)
        split = SplitModel(loaded.model, model.hook)
        seconds = {"load model": time.perf_counter() - started}
        start = time.perf_counter()
        base_ref, base = prepare_baseline(tokens, model, data, eval, split, progress)
        seconds["baseline (once per eval set)"] = time.perf_counter() - start
        probe_ref, probe_set = None, None
        if eval.probe_contexts:
            start = time.perf_counter()
            probe_ref, probe_set = prepare_probe_set(
                tokens.store, model, data, eval, split, loaded.tokenizer, progress
            )
            seconds["probe set (once per corpus)"] = time.perf_counter() - start
        result = evaluate.evaluate_sae(
            load_sae(sae),
            split,
            evaluate.load_eval_contexts(tokens),
            base,
            eval,
            _first_position(data),
            probe_set,
            progress,
        )
        seconds |= result.seconds
        seconds["total"] = time.perf_counter() - started
        sae_manifest = sae.manifest()
        with Store(sae.store).writing(loc.path) as writer:
            writer.write_json("latent_fire_counts.json", result.latent_fire_counts)
            writer.write_json("density_histogram.json", result.density._asdict())
            writer.write_json("probes.json", [p._asdict() for p in result.probes])
            writer.write_json("ablation_sparsity.json", result.ablation_sparsity)
            writer.manifest = {
                "kind": "evaluation",
                "fingerprint": loc.fingerprint,
                "sae": sae.uri,
                "n_latents": sae_manifest.get("n"),
                "k": sae_manifest.get("k"),
                "tokens": tokens.uri,
                "baseline": base_ref.uri,
                "probe_set": probe_ref.uri if probe_ref else None,
                "metrics": result.metrics,
                "seconds": seconds,
            }
            manifest = writer.manifest
    return loc.ref(int(manifest["metrics"]["eval_tokens"])), manifest["metrics"]


# latent statistics ----------------------------------------------------------------------------
_LATENTS_CODE = (
    "sae_core.latent_stats",
    "sae_core.latent_pages",
    "sae_core.streaming",
    "sae_core.explain",
    "sae_core.logit_lens",
    "sae_core.loader",
    "sae_core.sae.base",
)


def _lineage_model(sae: DatasetRef) -> str:
    """The model the SAE's activations came from, loadable here (a ConfigError if it is not)."""
    from sae_core.lineage import sae_lineage

    recorded = sae_lineage(sae).model
    try:
        return resolve_model_path(recorded)
    except ConfigError:
        raise ConfigError(
            f"latent statistics of {sae.uri}: its model {recorded!r} (from the activations "
            "manifest) is not on this machine; compute them where the SAE was trained"
        ) from None


def locate_latent_stats(sae: DatasetRef, latents: LatentsConfig) -> Location:
    return _located(
        "latents",
        sae.store,
        sae.fingerprint,
        path_fingerprint(_lineage_model(sae)),  # content, not the name it was loaded by
        latents,
        code=_LATENTS_CODE,
    )


def compute_latent_stats(
    sae: DatasetRef, latents: LatentsConfig, progress: bool = True
) -> tuple[DatasetRef, dict[str, float]]:
    """The viewer's dataset for a trained SAE (sae_core.latent_stats): statistics, contexts,
    logit lens and explanations from one pass over its eval activations; returns (ref, the
    explainability figures). The logit lens reads the model the activations came from."""
    import time

    from sae_core import latent_pages, latent_stats
    from sae_core.lineage import sae_lineage
    from sae_core.logit_lens import Unembedding
    from sae_core.models import load_model
    from sae_core.sae import load_sae

    loc = locate_latent_stats(sae, latents)
    if (manifest := loc.committed()) is None:
        started = time.perf_counter()
        lineage = sae_lineage(sae)
        loaded = load_model(_lineage_model(sae), "float32", "cpu")
        autoencoder, unembed = load_sae(sae), Unembedding.from_model(loaded.model)
        stats = latent_stats.latent_statistics(
            autoencoder, lineage.activations, unembed, latents, progress
        )
        about = {
            "sae": sae.uri,
            "sae_kind": autoencoder.cfg.kind,
            "d": autoencoder.d,
            "k": autoencoder.k,
            "model": lineage.model,
            "hook": lineage.hook,
            "activations": lineage.activations.uri,
        }
        with Store(sae.store).writing(loc.path) as writer:
            summary = latent_pages.write_latent_dataset(
                stats,
                lambda ids: loaded.tokenizer.batch_decode([[i] for i in ids]),
                writer,
                about,
                latents,
                progress,
            )
            writer.manifest = {
                "kind": "latent_stats",
                "fingerprint": loc.fingerprint,
                **about,
                "n_latents": autoencoder.n_latents,
                "metrics": latent_pages.explainability_metrics(summary["explainability"]),
                "seconds": time.perf_counter() - started,
            }
            manifest = writer.manifest
    return loc.ref(int(manifest["n_latents"])), manifest["metrics"]


# reports -------------------------------------------------------------------------------------
_REPORT_CODE = ("sae_core.report", "sae_core.plots", "sae_core.scaling", "sae_core.sweep")


class WrittenReport(NamedTuple):
    ref: DatasetRef
    markdown: str
    table: list[dict[str, Any]]


def _write_report(store: Store, loc: Location, report: Any, kind: str) -> WrittenReport:
    from sae_core.report import REPORT_FILE

    with store.writing(loc.path) as writer:
        for name, png in report.images.items():
            writer.write_bytes(name, png)
        writer.write_bytes(REPORT_FILE, report.markdown.encode())
        writer.write_json("table.json", report.table)
        writer.manifest = {
            "kind": kind,
            "fingerprint": loc.fingerprint,
            "files": [REPORT_FILE, "table.json", *report.images],
        }
    return WrittenReport(loc.ref(), report.markdown, report.table)


def _read_report(store: Store, loc: Location) -> WrittenReport:
    from sae_core.report import REPORT_FILE

    markdown = store.read_bytes(f"{loc.path}/{REPORT_FILE}").decode()
    return WrittenReport(loc.ref(), markdown, store.read_json(f"{loc.path}/table.json"))


def locate_run_report(sae: DatasetRef, evaluation: DatasetRef, title: str) -> Location:
    return _located(
        "run_report", sae.store, sae.fingerprint, evaluation.fingerprint, title, code=_REPORT_CODE
    )


def write_run_report(sae: DatasetRef, evaluation: DatasetRef, title: str) -> WrittenReport:
    """report.md, its figures and table.json for one trained, evaluated SAE."""
    from sae_core.metrics import DensityHistogram
    from sae_core.report import run_report

    loc = locate_run_report(sae, evaluation, title)
    store = Store(sae.store)
    if loc.committed() is not None:
        return _read_report(store, loc)
    sae_m, eval_m = sae.manifest(), evaluation.manifest()
    probes = [
        {k: p[k] for k in ("task", "latent", "loss", "baseline_loss", "positives")}
        for p in store.read_json(f"{evaluation.path}/probes.json")
    ]
    report = run_report(
        title,
        {k: sae_m.get(k) for k in ("d", "n", "k", "tokens_seen", "steps")},
        eval_m["metrics"],
        probes,
        store.read_json(f"{sae.path}/history.json"),
        DensityHistogram(**store.read_json(f"{evaluation.path}/density_histogram.json")),
        eval_m.get("seconds", {}),
        {"sae": sae.uri, "evaluation": evaluation.uri},
    )
    return _write_report(store, loc, report, "run_report")


def locate_sweep_report(points: list[Any], fit: Any, title: str) -> Location:
    """points: sae_core.sweep.SweepPoint; fit: sae_core.scaling.ScalingFit or None."""
    return _located(
        "sweep_report",
        points[0].sae.store,
        [(p.n, p.k, p.seed, p.evaluation.fingerprint) for p in points],
        fit,
        title,
        code=_REPORT_CODE,
    )


def write_sweep_report(points: list[Any], fit: Any, title: str) -> WrittenReport:
    """report.md, the sweep figures and table.json for a grid of trained, evaluated SAEs."""
    from sae_core.report import sweep_report
    from sae_core.sweep import SweepRow

    loc = locate_sweep_report(points, fit, title)
    store = Store(points[0].sae.store)
    if loc.committed() is not None:
        return _read_report(store, loc)
    rows, histories = [], []
    for p in points:
        train_dead = p.sae.manifest().get("dead_fraction", float("nan"))
        rows.append(SweepRow(p.n, p.k, p.seed, p.metrics, train_dead))
        histories.append((rows[-1].label, store.read_json(f"{p.sae.path}/history.json")))
    report = sweep_report(title, rows, fit, histories)
    return _write_report(store, loc, report, "sweep_report")


def locate_frontier_report(points: list[Any], title: str) -> Location:
    """points: sae_core.frontier.FrontierPoint."""
    return _located(
        "frontier_report",
        points[0].sae.store,
        [(p.family, p.degree, p.n, p.k, p.seed, p.evaluation.fingerprint) for p in points],
        title,
        code=_REPORT_CODE + ("sae_core.frontier",),
    )


def write_frontier_report(points: list[Any], title: str) -> WrittenReport:
    """report.md, the frontier plot and table.json for the frontier's trained, evaluated SAEs;
    their storage figures come from their manifests (written by training)."""
    from sae_core.frontier import FrontierRow, frontier_summary, frontier_table
    from sae_core.report import frontier_report

    loc = locate_frontier_report(points, title)
    store = Store(points[0].sae.store)
    if loc.committed() is not None:
        return _read_report(store, loc)
    rows = []
    for p in points:
        storage = p.sae.manifest()["storage"]
        rows.append(
            FrontierRow(
                p.family,
                p.degree,
                p.n,
                p.k,
                p.seed,
                p.metrics,
                storage["decoder_values"],
                storage["artifact_bytes"],
            )  # fmt: skip
        )
    table = frontier_table(rows)
    report = frontier_report(title, table, frontier_summary(table))
    return _write_report(store, loc, report, "frontier_report")
