"""What a dataset's `_MANIFEST.json` holds: one typed model per kind saeflow writes.

The `kind` string names the model. Writers build the model and hand it to the store
(`Store.commit`, `DatasetWriter.manifest`), which writes `to_json()`: the fields the writer set
(an optional field it left out stays absent), plus the `uri` the store adds. Readers get the
model back with `DatasetRef.manifest(Model)` or `Location.committed(Model)`; a manifest of
another kind, lacking a field or holding one of the wrong type raises DatasetDamaged, one line
naming the dataset, the kind, the field and the fix.

Most fields are required. Those of tokens and activations that describe where the data came
from are optional (`SyntheticCapable`): the benchmarks' synthetic datasets record only what
their readers need (the layout, the split sizes). `Manifest.recorded` checks them where they are
needed.
"""

from __future__ import annotations

from typing import Any, Literal, Self, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_core.errors import DatasetDamaged


class Part(BaseModel):
    """A manifest or a part nested in one: typed strictly (an integer field refuses "64"),
    closed (an unknown field is refused), frozen."""

    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True, use_attribute_docstrings=True
    )

    def to_json(self) -> dict[str, Any]:
        """The JSON-able dict of the fields set when the model was built or read."""
        return self.model_dump(mode="json", exclude_unset=True)


class Manifest(Part):
    """What every manifest holds. Each model narrows `kind` to the name(s) it reads."""

    kind: str
    """The dataset kind: which model reads the manifest."""
    fingerprint: str
    """The digest of the inputs and code that made the dataset: its folder's name."""
    uri: str | None = None
    """The dataset's URI; `Store.commit` adds it when it writes the manifest."""
    schema_version: int | None = None
    """The version of the kind's layout, in the kinds that carry one."""

    def to_json(self) -> dict[str, Any]:
        # A kind left to its default is not "set", yet it is always written.
        return {"kind": self.kind} | super().to_json()

    @classmethod
    def kinds(cls) -> tuple[str, ...]:
        """The kind strings this model reads."""
        return get_args(cls.model_fields["kind"].annotation)

    @classmethod
    def from_json(cls, raw: dict[str, Any], uri: str) -> Self:
        """The manifest `raw` of the dataset at `uri`, read by this model; DatasetDamaged if it
        is of another kind or does not fit."""
        found = raw.get("kind")
        if found not in cls.kinds():
            wanted = " or ".join(repr(kind) for kind in cls.kinds())
            raise _damaged(uri, f"kind is {found!r}, not {wanted}")
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise _damaged(uri, f"{found} manifest {_finding(err)}") from None

    def recorded(self, *fields: str) -> Self:
        """This manifest, once checked to hold the optional `fields` a reader needs;
        DatasetDamaged names those it lacks."""
        lacking = [name for name in fields if getattr(self, name) is None]
        if lacking:
            raise _damaged(str(self.uri), f"{self.kind} manifest lacks {', '.join(lacking)}")
        return self


AnyManifest = TypeVar("AnyManifest", bound=Manifest)


def _damaged(uri: str, reason: str) -> DatasetDamaged:
    """The error for a manifest that cannot be read: `reason` is the finding alone."""
    return DatasetDamaged(
        f"dataset {uri}: {reason}; delete the folder {uri} and run again: it is recomputed",
        reason,
    )


def _finding(err: ValidationError) -> str:
    """What is wrong, in a few words: the missing fields, else the first bad one."""
    errors = err.errors()
    missing = [_field(e["loc"]) for e in errors if e["type"] == "missing"]
    if missing:
        return f"lacks {', '.join(missing)}"
    first = errors[0]
    if first["type"] == "extra_forbidden":
        return f"holds an unknown field {_field(first['loc'])}"
    shown = repr(first["input"])
    shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
    return f"field {_field(first['loc'])} is {shown}: {first['msg']}"


def _field(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


# Links and nested parts -------------------------------------------------------------------------
class DatasetLink(Part):
    """A dataset this one was made from."""

    uri: str
    """Its URI."""
    fingerprint: str
    """Its fingerprint."""


class TokensSplit(Part):
    """One split of a tokens dataset."""

    contexts: int
    """Token contexts in the split: the rows of `<split>.parquet`."""
    tokens: int
    """contexts x context_len."""
    bytes: int | None = None
    """The size of `<split>.parquet` (absent from synthetic datasets)."""
    documents: int | None = None
    """Documents the split's contexts come from (absent before the split by document)."""


class ActivationsShard(Part):
    """One Parquet shard of an activations split."""

    name: str
    """Its file in the dataset folder, e.g. `train/shard-00003.parquet` (older manifests may
    leave out the split folder)."""
    rows: int
    """Activation rows (tokens) it holds."""
    bytes: int
    """The file's size."""
    norm_sum: float
    """The sum of its rows' L2 norms (accumulated in float64)."""
    norm_max: float
    """The largest L2 norm among its rows."""
    contexts: tuple[int, int] | None = Field(None, strict=False)  # a JSON list reads as a tuple
    """The token contexts [start, stop) of the tokens dataset's split it was extracted from
    (absent from synthetic datasets and from those extracted before shards were context
    ranges)."""


class ActivationsSplit(Part):
    """One split of an activations dataset; the figures on its rows' norms are absent from
    synthetic datasets."""

    rows: int
    """Activation rows in the split: the sum of its shards' rows."""
    shards: list[ActivationsShard]
    """Its shards, in storage order."""
    dropped_max_norm: int | None = None
    """Rows dropped because their norm exceeded data.max_norm."""
    norm_mean: float | None = None
    """The mean L2 norm of its rows."""
    norm_max: float | None = None
    """The largest L2 norm among its rows."""


class Normalization(Part):
    """How an SAE normalises its inputs (sae_core.sae.normalize.InputNorm)."""

    mode: str
    """per_token, global or none."""
    global_scale: float
    """The constant c of x_norm = c x in global mode (1.0 otherwise)."""


class StorageFigures(Part):
    """What an SAE's decoder and file cost against a dense TopK SAE of the same n and d
    (sae_core.sae.storage_report)."""

    decoder_values: int
    """Learned decoder values: n x degree (n x d for TopK)."""
    dense_decoder_values: int
    """n x d."""
    compression: float
    """d / degree."""
    artifact_bytes: int
    """The size of sae.safetensors."""
    dense_artifact_bytes: int
    """That file's size with dense TopK weight tensors."""


# The kinds --------------------------------------------------------------------------------------
class SyntheticCapable(Manifest):
    """A kind the benchmarks also write as synthetic datasets (sae_core.bench), which record
    only what the data's readers need: what describes where the data came from, the
    fingerprint among it, is optional."""

    fingerprint: str | None = None
    """As in every manifest; absent from synthetic datasets."""


class TokensManifest(SyntheticCapable):
    """`tokens/`: a corpus cut into token contexts (sae_core.data.tokens)."""

    kind: Literal["tokens"] = "tokens"
    context_len: int
    """Tokens per context."""
    vocab_size: int
    """The tokenizer's vocabulary size."""
    splits: dict[str, TokensSplit]
    """The splits by name (`train`, `eval`)."""
    # What sampling records of its source (absent from synthetic datasets).
    tokenizer: str | None = None
    """The tokenizer's name or path."""
    corpus: str | None = None
    """data.corpus: the corpus as configured."""
    text_column: str | None = None
    """data.text_column."""
    seed: int | None = None
    """data.seed, which drew the contexts and split them."""
    eos_token_id: int | None = None
    """The token that joins documents (None when the tokenizer has none)."""
    corpus_documents: int | None = None
    """Documents in the corpus."""
    documents_tokenized: int | None = None
    """Documents tokenised to fill the contexts."""
    stream_tokens: int | None = None
    """Tokens in the stream the contexts were cut from."""
    split: Literal["document", "context"] | None = None
    """data.split: eval held out by document, or contexts split at random (absent: the latter)."""
    eval_contexts_per_document: int | None = None
    """data.eval_contexts_per_document, with split=document."""


class ActivationsManifest(SyntheticCapable):
    """`activations/`: one hook's activation per token, in Parquet shards
    (sae_core.data.activations; read by sae_core.storage.loader)."""

    kind: Literal["activations"] = "activations"
    schema_version: int
    """The shards' layout: 1 a list column, 2 the storage layout (sae_core.storage.layout)."""
    width: int
    """d: values per activation row."""
    dtype: str
    """The stored dtype: float32 or float16."""
    splits: dict[str, ActivationsSplit]
    """The splits by name (`train`, `eval`)."""
    # What extraction records of its source (absent from synthetic datasets, some of it from
    # older ones).
    model: str | None = None
    """The language model's path or name."""
    model_dtype: str | None = None
    """The dtype the model ran in."""
    model_devices: list[str] | None = None
    """The devices the model ran on, resolved from model.device (cpu, cuda:0), one per distinct
    device the shards were made on."""
    hook: str | None = None
    """The hook point read, e.g. resid_post.15."""
    context_len: int | None = None
    """Tokens per context of the tokens dataset."""
    batch_tokens: int | None = None
    """data.batch_tokens: tokens per extraction forward pass."""
    shard_rows: int | None = None
    """The most rows a shard holds."""
    contexts_per_shard: int | None = None
    """Whole token contexts per shard."""
    skip_first_position: bool | None = None
    """Whether position 0 of every context was dropped."""
    max_norm: float | None = None
    """data.max_norm: rows with a larger norm were dropped (None: no filter)."""
    tokens: DatasetLink | None = None
    """The tokens dataset extracted from."""


class SaeManifest(Manifest):
    """`sae/`: a trained SAE, its weights in sae.safetensors (sae_core.training.train)."""

    kind: Literal["sae"] = "sae"
    activations: str
    """The URI of the activations dataset it was trained on (on the same store); a
    transcoder's input hook."""
    activations_out: str | None = None
    """A transcoder's: the URI of the paired dataset of its output hook (its target)."""
    sae_kind: str
    """sae.kind: topk, expander, matryoshka, transcoder or skip_transcoder."""
    d: int
    """Input width."""
    n: int
    """Latents."""
    k: int
    """Active latents per token."""
    k_aux: int
    """Dead latents AuxK reconstructs from."""
    normalization: Normalization
    """How inputs are normalised."""
    tokens_seen: int
    """Training tokens, all epochs."""
    steps: int
    """Optimiser steps."""
    lr: float
    """The peak learning rate trained with."""
    recipe: str | None = None
    """train.recipe: paper or budget (absent: written before recipes, the paper's)."""
    lr_warmup_steps: int | None = None
    """Steps of linear warm-up."""
    lr_decay: Literal["none", "linear"] | None = None
    """How the rate fell after warm-up."""
    optimizer: str | None = None
    """The recipe's optimiser: adam or schedule_free_adam, whose average is the SAE (absent:
    written before it was recorded, adam)."""
    final_nmse: float
    """The normalised MSE, mean over the last 5% of steps."""
    dead_fraction: float
    """Latents silent for sae.dead_window_tokens (AuxK's criterion)."""
    dead_fraction_run: float
    """Latents silent over min(the window, the whole run)."""
    weights: Literal["ema", "last"]
    """Which weights were saved: the moving average or the last step's."""
    storage: StorageFigures
    """The decoder's and the file's cost against a dense TopK SAE."""
    resumed_from_tokens: int
    """Tokens of the checkpoint training resumed from (0 for a fresh run)."""
    device: str | None = None
    """The device training ran on, resolved from train.device (cpu, cuda:0; rank 0's with
    train.world_size > 1). Absent from SAEs trained before it was recorded."""
    gemm_dtype: str | None = None
    """The encoder GEMM's dtype (train.dtype); the weights and the rest of the step are float32."""
    batch_topk_threshold: float | None = None
    """The inference threshold of a BatchTopK SAE (present only for those)."""
    matryoshka_prefixes: list[int] | None = None
    """A Matryoshka SAE's nested dictionary sizes in latents, the last n (present only for those)."""


class BaselineManifest(Manifest):
    """`baseline/`: the eval set's activations at the hook and its ablated losses
    (sae_core.evaluation.baseline)."""

    kind: Literal["baseline"] = "baseline"
    tokens: str
    """The URI of the tokens dataset whose eval split it covers."""
    hook: str
    """The hook point."""
    contexts: int
    """Eval contexts."""
    ce_sums: dict[str, float]
    """Summed next-token cross-entropy with the hook's output ablated, by ablation (zero, mean)."""
    terms: int
    """Token predictions summed over."""


class ProbeSetManifest(Manifest):
    """`probes/`: labelled contexts and their activations at the hook
    (sae_core.evaluation.probe_data)."""

    kind: Literal["probe_set"] = "probe_set"
    corpus: str
    """The corpus the contexts come from: eval.probe_corpus, or data.corpus without it."""
    hook: str
    """The hook point."""
    contexts: int
    """Probe contexts; 0 when the corpus carries no labels (then no data file)."""
    token_sample: int
    """Tokens sampled for the part-of-speech probes."""
    genres: list[str]
    """Genre names, in label order."""
    pos_classes: list[str]
    """Part-of-speech classes, in label order."""


class EvaluationManifest(Manifest):
    """`eval/`: an SAE spliced into the model on the eval split (sae_core.evaluation)."""

    kind: Literal["evaluation"] = "evaluation"
    sae: str
    """The URI of the evaluated sae dataset."""
    n_latents: int
    """The SAE's latents."""
    k: int
    """The SAE's active latents per token."""
    tokens: str
    """The URI of the tokens dataset evaluated on."""
    baseline: str
    """The URI of the baseline dataset used."""
    probe_set: str | None
    """The URI of the probe set used (None: no probes)."""
    metrics: dict[str, float]
    """The figures by name (nmse, l0, ce_loss_recovered, eval_tokens, ...)."""
    seconds: dict[str, float]
    """Where the evaluation's time went, by step."""


class LetterSetManifest(Manifest):
    """`letters/`: the first-letter task's words, their activations at the hook and the
    ground-truth letter probes (sae_core.evaluation.first_letter)."""

    kind: Literal["letter_set"] = "letter_set"
    hook: str
    """The hook point."""
    words: list[str]
    """The sampled single-token words, in row order."""
    vocabulary: int
    """Single-token words the tokenizer has (the sample's population)."""


class SaeBenchManifest(Manifest):
    """`saebench/`: SAEBench's offline evaluations of an SAE (sae_core.evaluation:
    saebench_core, sparse_probing, absorption)."""

    kind: Literal["saebench"] = "saebench"
    sae: str
    """The URI of the evaluated sae dataset."""
    baseline: str
    """The URI of the baseline dataset whose eval activations the core metrics read."""
    probe_set: str | None
    """The URI of the probe set the sparse probes used (None: no sparse probing)."""
    letter_set: str | None
    """The URI of the first-letter set absorption used (None: no absorption)."""
    metrics: dict[str, float]
    """The figures by name (explained_variance, absorption_full, sparse_probe_acc_k1, ...)."""
    seconds: dict[str, float]
    """Where the stage's time went, by step."""
    skipped: dict[str, str] = {}
    """Evaluations the config asked for that do not apply to this SAE, each with why (a
    transcoder's absorption); absent from manifests written before transcoders were scored."""


class LatentStatsManifest(Manifest):
    """`latents/`: the latent viewer's dataset and explainability figures (sae_core.latents)."""

    kind: Literal["latent_stats"] = "latent_stats"
    sae: str
    """The URI of the sae dataset described."""
    sae_kind: str
    """topk, expander or matryoshka."""
    matryoshka_prefixes: list[int] | None = None
    """A Matryoshka SAE's nested dictionary sizes (present only for those)."""
    d: int
    """The SAE's input width."""
    k: int
    """The SAE's active latents per token."""
    n_latents: int
    """The SAE's latents."""
    model: str
    """The language model the activations came from."""
    hook: str
    """The hook point."""
    activations: str
    """The URI of the activations dataset read."""
    metrics: dict[str, float]
    """The explainability figures (explain/...)."""
    seconds: float
    """Time to compute the dataset."""


class ReportManifest(Manifest):
    """`run_report/`, `sweep_report/`, `frontier_report/`: report.md, table.json and figures
    (sae_core.studies.report); one model, as one writer makes all three."""

    kind: Literal["run_report", "sweep_report", "frontier_report"]
    files: list[str]
    """The report's files in the dataset folder: report.md, table.json, then the figures."""


class ValidationManifest(Manifest):
    """`validation/`: the outcome of validating an activations dataset, its data docs in the
    folder (tasks.validate). The fingerprint is the dataset's."""

    kind: Literal["validation"] = "validation"
    dataset: str
    """The URI of the activations dataset checked."""
    passed: bool
    """Whether every check passed."""
    shards: int
    """Shards checked."""
    rows: int
    """Rows read."""
    failures: list[str]
    """One line per failed check (empty when passed)."""
    docs: str
    """The URL of the data docs' index page."""
