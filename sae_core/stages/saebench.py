"""Stage `saebench`: SAEBench's offline evaluations of a trained SAE (core metrics, k-sparse
probing, feature absorption; sae_core.evaluation), with the input it alone needs, the
first-letter `letters` set (words, activations, ground-truth probes: once per model and hook).
The eval set's `baseline` and the `probes` set are the evaluation stage's, reused from the
store (made here when absent).

A transcoder is scored on its own task: its core metrics compare model.hook_out's activation
with its prediction from model.hook's (`transcoder_core`, on the baseline at model.hook_out);
its sparse probes read its latents, computed from model.hook as for an SAE; absorption is
skipped, the reason recorded in the manifest (`ABSORPTION_SKIPPED`)."""

from __future__ import annotations

import time
from typing import Any

import torch

from sae_core.config import DataConfig, EvalConfig, ModelConfig, SaeBenchConfig
from sae_core.data import models
from sae_core.data.activations import first_position
from sae_core.data.assets import resolve_model_path
from sae_core.data.models import load_model
from sae_core.evaluation import (
    absorption,
    baseline,
    first_letter,
    metrics,
    probe_data,
    probes,
    saebench_core,
    sparse_probing,
    splice,
    transcode,
    transcoder_core,
)
from sae_core.evaluation.evaluate import load_eval_contexts
from sae_core.evaluation.splice import SplitModel
from sae_core.sae import load_sae
from sae_core.stages.evaluate import (
    PROBE_EVAL_FIELDS,
    locate_baseline,
    locate_probe_set,
    prepare_baseline,
    prepare_probe_set,
    probe_inputs,
    spliced_model,
    transcoder_input,
)
from sae_core.stages.location import Location, hook_identity, located
from sae_core.storage.manifests import (
    BaselineManifest,
    LetterSetManifest,
    ProbeSetManifest,
    SaeBenchManifest,
)
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

LETTER_CODE = (first_letter, metrics, splice, models)
SAEBENCH_CODE = (
    saebench_core, sparse_probing, absorption, first_letter, probes, probe_data, metrics,
    baseline, splice, models,
)  # fmt: skip
# A transcoder's core metrics run these too (an SAE's address does not depend on them).
TRANSCODER_CODE = (transcoder_core, transcode)
ABSORPTION_SKIPPED = (
    "SAEBench's first-letter protocol compares decoder directions with a probe trained at the "
    "SAE's own hook; a transcoder's decoder writes to model.hook_out, not model.hook"
)
_LETTER_FIELDS = {"absorption_words", "icl_examples", "seed"}


def locate_letter_set(store: str, model: ModelConfig, cfg: SaeBenchConfig) -> Location:
    return located(
        "letters",
        store,
        *hook_identity(model),
        cfg.model_dump(include=_LETTER_FIELDS),
        code=LETTER_CODE,
    )


def prepare_letter_set(
    store: str,
    model: ModelConfig,
    cfg: SaeBenchConfig,
    split: SplitModel,
    tokenizer: Any,
    progress: bool = True,
) -> tuple[DatasetRef, first_letter.LetterSet]:
    """The first-letter set of the model at the hook, from the store or made: (ref, LetterSet)."""
    loc = locate_letter_set(store, model, cfg)
    st = Store(store)
    if (manifest := loc.committed(LetterSetManifest)) is not None:
        data = st.read_bytes(f"{loc.path}/{first_letter.FILE}")
        return loc.ref(len(manifest.words)), first_letter.letter_set_from(data, manifest.words)
    result = first_letter.build_letter_set(
        split,
        tokenizer,
        cfg.absorption_words,
        cfg.icl_examples,
        cfg.batch_prompts,
        cfg.seed,
        progress,
    )
    with st.writing(loc.path) as writer:
        writer.write_bytes(first_letter.FILE, first_letter.letter_set_bytes(result))
        writer.manifest = LetterSetManifest(
            fingerprint=loc.fingerprint,
            hook=model.hook,
            words=result.words,
            vocabulary=len(first_letter.single_token_words(tokenizer)),
        )
    return loc.ref(len(result.words)), result


def locate_saebench(
    sae: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    saebench: SaeBenchConfig,
) -> Location:
    """A transcoder's (model.hook_out set) also names its output hook and its own code; an
    SAE's address is what it was before transcoders were scored."""
    transcoder = () if model.hook_out is None else (model.hook_out,)
    return located(
        "saebench",
        sae.store,
        sae.fingerprint,
        tokens.fingerprint,
        *hook_identity(model),
        probe_inputs(data, eval),
        eval.model_dump(include=PROBE_EVAL_FIELDS),
        saebench.model_dump(exclude={"enabled", "batch_prompts"}),
        *transcoder,
        code=SAEBENCH_CODE + (TRANSCODER_CODE if transcoder else ()),
    )


def remove_saebench(
    sae: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    saebench: SaeBenchConfig,
) -> None:
    """Delete the stage's output and the letter set it used (a transcoder uses none): the next
    run makes both afresh (the baseline and probe set are the evaluation stage's to refresh)."""
    locate_saebench(sae, tokens, model, data, eval, saebench).remove()
    if model.hook_out is None:
        locate_letter_set(sae.store, model, saebench).remove()


def _needs_model(
    tokens: DatasetRef, model: ModelConfig, data: DataConfig, eval: EvalConfig, cfg: SaeBenchConfig
) -> bool:
    """Whether some input must be computed (the model is loaded only then)."""
    wanted: list[tuple[Location, type]] = [(locate_baseline(tokens, model, data), BaselineManifest)]
    if eval.probe_contexts and cfg.sparse_probe_ks:
        wanted.append((locate_probe_set(tokens.store, model, data, eval), ProbeSetManifest))
    if cfg.absorption_words:
        wanted.append((locate_letter_set(tokens.store, model, cfg), LetterSetManifest))
    return any(loc.committed(kind) is None for loc, kind in wanted)


def saebench_sae(
    sae: DatasetRef,
    tokens: DatasetRef,
    model: ModelConfig,
    data: DataConfig,
    eval: EvalConfig,
    saebench: SaeBenchConfig,
    progress: bool = True,
) -> tuple[DatasetRef, dict[str, float]]:
    """SAEBench's offline evaluations of a trained SAE or transcoder: (ref, metrics)."""
    loc = locate_saebench(sae, tokens, model, data, eval, saebench)
    if (manifest := loc.committed(SaeBenchManifest)) is not None:
        return loc.ref(), manifest.metrics
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    sae_model = load_sae(sae).eval()
    hook_in = transcoder_input(sae_model, model)  # None for an SAE
    scored = spliced_model(model, hook_in is not None)
    loaded = None  # a transcoder's core metrics run the model to its input hook
    if hook_in is not None or _needs_model(tokens, model, data, eval, saebench):
        loaded = load_model(resolve_model_path(model.path), model.dtype, model.device)
        sae_model = sae_model.to(next(loaded.model.parameters()).device)
        seconds["load model"] = time.perf_counter() - started
    tokenizer = None if loaded is None else loaded.tokenizer

    def split_at(hook: str) -> SplitModel | None:
        """The model cut at `hook`; None when no input is computed here."""
        return None if loaded is None else SplitModel(loaded.model, hook)

    def timed(step: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        seconds[step] = time.perf_counter() - start
        return out

    base_ref, base = timed(
        "baseline (the evaluation's)",
        prepare_baseline,
        tokens, scored, data, eval, split_at(scored.hook), progress,
    )  # fmt: skip
    if hook_in is None:
        acts = base.act[:, first_position(data) :]
        with torch.inference_mode():
            result = timed(
                "core",
                saebench_core.core_metrics,
                sae_model,
                acts.reshape(-1, acts.shape[-1]),
                saebench.decoder_sample,
                saebench.seed,
            )
    else:
        result = timed(
            "core",
            transcoder_core.transcoder_core_metrics,
            sae_model, loaded.model, load_eval_contexts(tokens), base.act, hook_in,
            first_position(data), eval.batch_contexts, saebench.decoder_sample, saebench.seed,
        )  # fmt: skip
    probe_ref = letter_ref = None
    sparse: list[sparse_probing.SparseProbeResult] = []
    if eval.probe_contexts and saebench.sparse_probe_ks:
        # At model.hook: an SAE's latents, and a transcoder's too (they read its input).
        probe_ref, probe_set = timed(
            "probe set (the evaluation's)",
            prepare_probe_set,
            tokens.store, model, data, eval, split_at(model.hook), tokenizer, progress,
        )  # fmt: skip
        if probe_set is not None:
            with torch.inference_mode():
                sparse = timed(
                    "sparse probing",
                    sparse_probing.sparse_probing,
                    sae_model.cpu(),
                    probe_set,
                    tuple(saebench.sparse_probe_ks),
                )
            result |= sparse_probing.sparse_probing_summary(sparse)
    letters: list[absorption.LetterAbsorption] = []
    skipped: dict[str, str] = {}
    if saebench.absorption_words and hook_in is not None:
        skipped["absorption"] = ABSORPTION_SKIPPED
    elif saebench.absorption_words:
        letter_ref, letter_set = timed(
            "letter set (once per model and hook)",
            prepare_letter_set,
            tokens.store, model, saebench, split_at(model.hook), tokenizer, progress,
        )  # fmt: skip
        with torch.inference_mode():
            letters = timed(
                "absorption",
                absorption.letter_absorption,
                sae_model.cpu(),
                letter_set,
                saebench.max_k,
                saebench.f1_jump,
            )
        result |= absorption.absorption_summary(
            letters, saebench.min_probe_f1, saebench.min_letters
        )
    seconds["total"] = time.perf_counter() - started
    with Store(sae.store).writing(loc.path) as writer:
        writer.write_json("sparse_probing.json", [r._asdict() for r in sparse])
        writer.write_json("absorption.json", [r._asdict() for r in letters])
        manifest = SaeBenchManifest(
            fingerprint=loc.fingerprint,
            sae=sae.uri,
            baseline=base_ref.uri,
            probe_set=probe_ref.uri if probe_ref else None,
            letter_set=letter_ref.uri if letter_ref else None,
            metrics=result,
            skipped=skipped,
            seconds=seconds,
        )
        writer.manifest = manifest
    return loc.ref(), manifest.metrics
