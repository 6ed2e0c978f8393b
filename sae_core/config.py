"""Typed pipeline configuration, YAML presets and `--set key.path=value` overrides."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sae_core.errors import ConfigError
from sae_core.yaml_files import YAML_FAILURES, read_yaml

# Package data: a preset is found by name wherever saeflow is installed.
PRESET_DIR = Path(str(resources.files("sae_core") / "presets"))


# A seed fits 32 bits: the trainer and loader mix it as seed * 1_000_003 + step into torch's
# 64-bit generator seed, which a larger one would overflow (an OverflowError deep in training).
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class _Strict(BaseModel):
    # NaN and inf pass `gt`/`ge` bounds (inf > 0) and would train a NaN SAE: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    path: str = Field(
        "smollm2-135m",
        description="A demo asset name (see `saeflow assets`), a local HF model folder, or a hub id.",
    )
    hook: str = Field("resid_post.15", pattern=r"^[a-z_]+\.\d+$", description="e.g. resid_post.15")
    hook_out: str | None = Field(
        None,
        pattern=r"^[a-z_]+\.\d+$",
        description="Transcoders only: the hook they reconstruct from model.hook, e.g. mlp_out.6 "
        "read from mlp_in.6; None for an SAE (it reconstructs model.hook itself).",
    )
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool = Field(
        False,
        description="Extract through torch.compile (inductor, weights frozen): faster on a CPU "
        "in bfloat16 after 20-40 s of compiling, so for long extractions; resid_post hooks only.",
    )


class DataConfig(_Strict):
    corpus: str = Field(
        "brown",
        description="A demo corpus name, local .txt/.jsonl/.parquet files or folder, or a hub dataset.",
    )
    text_column: str = "text"
    context_len: int = Field(64, ge=2, le=8192)
    train_tokens: int = Field(2**17, ge=1)
    eval_tokens: int = Field(2**13, ge=1)
    seed: Seed = 0
    split: Literal["document", "context"] = Field(
        "document",
        description="document: eval contexts come from documents training never sees (held out "
        "by document); context: contexts are split at random, so eval and train share documents.",
    )
    eval_contexts_per_document: int = Field(
        4,
        ge=1,
        description="split=document: contexts an eval document contributes at most (the rest of "
        "it is left out of both splits), so the eval set spans many documents.",
    )
    skip_first_position: bool = Field(
        True, description="Drop position 0 of every context: an attention sink with a huge norm."
    )
    max_norm: float | None = Field(
        None,
        gt=0,
        description="Drop tokens whose activation norm exceeds this (explicit outlier filter).",
    )
    batch_tokens: int = Field(
        2048, ge=1, description="Tokens per extraction forward pass (whole contexts, at least one)."
    )
    shard_mb: float = Field(128, gt=0, description="Target size of an activation shard in MiB.")
    shard_rows: int | None = Field(
        None, ge=1, description="Rows per activation shard; overrides data.shard_mb when set."
    )
    storage_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="Stored activation dtype. bfloat16 models' activations are always stored as "
        "float32: exact for bf16, where float16 would clip its range (Parquet has no bfloat16).",
    )


class SAEConfig(_Strict):
    kind: Literal["topk", "expander", "matryoshka", "transcoder", "skip_transcoder"] = Field(
        "topk",
        description="topk: dense decoder (Gao et al.); expander: each decoder direction has "
        "sae.degree non-zeros on a random expander graph (Mendoza-Smith, 2026); matryoshka: "
        "topk's weights trained so that every prefix in sae.matryoshka_prefixes reconstructs "
        "alone (Bussmann et al., 2025), BatchTopK unless sae.batch_topk=false; transcoder: "
        "TopK latents of model.hook reconstruct model.hook_out; skip_transcoder: plus a learned "
        "linear map from input to output (arXiv 2501.18823).",
    )
    n_latents: int = Field(4608, ge=1)
    k: int = Field(32, ge=1)
    k_aux: int | None = Field(None, ge=1, description="Dead latents used by AuxK; default d/2.")
    aux_alpha: float = Field(1 / 32, ge=0)
    dead_window_tokens: int = Field(
        10_000_000, ge=1, description="A latent is dead after this many tokens without firing."
    )
    multi_topk: bool = False
    batch_topk: bool = Field(
        False,
        description="BatchTopK: keep the top k*B pre-activations of each training batch (k per "
        "token on average); inference keeps those above a threshold estimated in training.",
    )
    normalize: Literal["per_token", "global", "none"] = "per_token"
    b_pre_init: Literal["geometric_median", "mean"] = "geometric_median"
    degree: int | None = Field(
        None,
        ge=1,
        description="Expander: non-zeros per decoder direction, 1 <= degree <= model width; "
        "compression = width / degree.",
    )
    encoder: Literal["untied", "tied"] = Field(
        "untied",
        description="Expander: untied = a dense encoder (Gao's recipe); tied = the masked "
        "decoder transposed at every step (the paper's choice).",
    )
    mask_seed: Seed = Field(0, description="Expander: seed of the decoder's random graph.")
    resample_dead: bool = Field(
        False,
        description="Expander: at every sae.dead_window_tokens boundary, re-initialise the dead "
        "latents inside their mask support (the paper's choice).",
    )
    matryoshka_prefixes: list[float] | None = Field(
        None,
        min_length=1,
        description="Matryoshka: the nested dictionaries whose reconstruction losses are summed, "
        "as latent counts ending with sae.n_latents (e.g. [288, 1152, 4608]) or, when every "
        "value is <= 1, as fractions of it ending with 1 (e.g. [0.0625, 0.25, 1]); None: "
        "[1/16, 1/4, 1].",
    )

    @model_validator(mode="before")
    @classmethod
    def _matryoshka_is_batch_topk(cls, data: Any) -> Any:
        # Matryoshka BatchTopK is the kind's recipe; sae.batch_topk=false asks for per-token TopK.
        if isinstance(data, dict) and data.get("kind") == "matryoshka":
            return {"batch_topk": True, **data}
        return data

    @model_validator(mode="after")
    def _k_within_n(self) -> SAEConfig:
        if self.k > self.n_latents:
            raise ValueError(
                f"sae.k={self.k} exceeds sae.n_latents={self.n_latents}; choose k <= n_latents"
            )
        if self.k_aux is not None and self.k_aux > self.n_latents:
            raise ValueError(
                f"sae.k_aux={self.k_aux} exceeds sae.n_latents={self.n_latents} (AuxK picks "
                "among the dead latents); choose sae.k_aux <= sae.n_latents"
            )
        if self.multi_topk and 4 * self.k > self.n_latents:
            raise ValueError("sae.multi_topk needs 4*k <= n_latents; lower sae.k or disable it")
        if self.multi_topk and self.batch_topk:
            raise ValueError("sae.batch_topk and sae.multi_topk cannot be combined; disable one")
        return self

    @model_validator(mode="after")
    def _expander_fields(self) -> SAEConfig:
        if self.kind == "expander" and self.degree is None:
            raise ValueError(
                "sae.kind=expander needs sae.degree (non-zeros per decoder direction, "
                "1 <= degree <= model width); set e.g. sae.degree=8"
            )
        if self.kind != "expander":
            defaults = {"degree": None, "encoder": "untied", "mask_seed": 0, "resample_dead": False}
            stray = [name for name, value in defaults.items() if getattr(self, name) != value]
            if stray:
                raise ValueError(
                    f"sae.kind={self.kind} does not use "
                    f"{', '.join(f'sae.{name}' for name in stray)}; "
                    "remove it or set sae.kind=expander"
                )
        return self

    @model_validator(mode="after")
    def _matryoshka_fields(self) -> SAEConfig:
        if self.kind != "matryoshka":
            if self.matryoshka_prefixes is not None:
                raise ValueError(
                    f"sae.kind={self.kind} does not use sae.matryoshka_prefixes; "
                    "remove it or set sae.kind=matryoshka"
                )
            return self
        if self.multi_topk:
            raise ValueError(
                "sae.kind=matryoshka and sae.multi_topk cannot be combined; disable multi_topk"
            )
        self.prefix_sizes()  # raises on prefixes that do not nest
        return self

    def prefix_sizes(self) -> tuple[int, ...]:
        """Matryoshka: the nested dictionaries' sizes in latents, increasing, the last n_latents
        (sae.matryoshka_prefixes resolved; fractions round to the nearest count). ValueError
        naming the field when they do not nest."""
        given = self.matryoshka_prefixes or [1 / 16, 1 / 4, 1.0]
        field = f"sae.matryoshka_prefixes={given}" + (
            "" if self.matryoshka_prefixes else " (default)"
        )
        n = self.n_latents
        if min(given) <= 0:
            raise ValueError(f"{field}: give positive sizes (latent counts, or fractions of n)")
        if max(given) <= 1:  # fractions of n
            sizes = [round(f * n) for f in given]
            fix = f"give increasing fractions ending with 1 that stay distinct at n_latents={n}"
        else:
            if any(v != int(v) for v in given):
                raise ValueError(f"{field}: latent counts must be integers (or all values <= 1)")
            sizes = [int(v) for v in given]
            fix = f"give increasing latent counts ending with sae.n_latents={n}"
        if sizes[0] < 1 or any(a >= b for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError(
                f"{field} resolves to {sizes} latents: each must be >= 1 and larger than the "
                f"one before; {fix}"
            )
        if sizes[-1] != n:
            raise ValueError(
                f"{field}: the last prefix must be the whole dictionary ({n} latents); {fix}"
            )
        return tuple(sizes)

    @model_validator(mode="after")
    def _transcoder_norm(self) -> SAEConfig:
        if self.kind in TRANSCODER_KINDS and self.normalize == "per_token":
            raise ValueError(
                f"sae.kind={self.kind} cannot use sae.normalize=per_token (a token's output scale "
                "is not known from its input); set sae.normalize=global or none"
            )
        return self


TRANSCODER_KINDS = ("transcoder", "skip_transcoder")


def check_expander_graph(n_latents: int, width: int, degree: int) -> None:
    """ConfigError naming sae.degree unless an expander decoder exists for this model width:
    1 <= degree <= width, and degree * n_latents >= width (every coordinate used)."""
    if not 1 <= degree <= width:
        raise ConfigError(
            f"sae.degree={degree} exceeds the model width {width}; "
            f"choose 1 <= sae.degree <= {width}"
        )
    if degree * n_latents < width:
        raise ConfigError(
            f"sae.degree={degree} x sae.n_latents={n_latents} non-zeros cannot cover all "
            f"{width} coordinates of the model width; raise sae.degree to at least "
            f"{-(-width // n_latents)} or sae.n_latents"
        )


# How a run executes, not what it computes: left out of the SAE's address and of the check that
# a checkpoint belongs to the run resuming it (a run may resume on another device or rank count).
TRAIN_EXECUTION_FIELDS = frozenset({"device", "world_size", "nnodes", "node_rank", "rendezvous"})


class TrainConfig(_Strict):
    batch_size: int = Field(4096, ge=1, description="Tokens per optimiser step.")
    epochs: int = Field(1, ge=1, description="Passes over the data (unless train.tokens is set).")
    tokens: int | None = Field(
        None,
        ge=1,
        description="Training tokens in all, taking as many passes over the data as that needs "
        "(the last one cut short); None: train.epochs whole passes.",
    )
    recipe: Literal["budget", "paper"] = Field(
        "budget",
        description="paper: Gao et al.'s constant 2e-4 / sqrt(n / 2^14); budget: that rate raised "
        "for short runs, 5% linear warm-up, linear decay to zero (sae_core.training.recipe).",
    )
    lr: float | None = Field(None, gt=0, description="Peak learning rate; None: the recipe's.")
    lr_warmup: float | None = Field(
        None, ge=0, lt=1, description="Fraction of the steps warming up; None: the recipe's."
    )
    lr_decay: Literal["none", "linear"] | None = Field(
        None, description="none or linear (to zero at the last step); None: the recipe's."
    )
    seed: Seed = 0
    checkpoint_every_tokens: int = Field(2**16, ge=1)
    grad_clip_norm: float | None = Field(None, gt=0, description="Gradient-norm clip; None: off")
    adam_eps: float = Field(
        6.25e-10,
        gt=0,
        description="Adam's epsilon (Gao et al.: 6.25e-10). A gradient far below it moves its "
        "weight by about lr * gradient / eps instead of about lr.",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the weights (e.g. 0.999) and save it "
        "as the trained SAE; None: off.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Precision of the encoder GEMM (the step's one dense product); the rest "
        "stays float32. float32 is deterministic; bfloat16 pays off on GPUs and CPUs with bf16 units.",
    )
    device: str = "auto"
    world_size: int = Field(
        1,
        ge=1,
        le=1024,
        description="Data-parallel processes on this node (torch.distributed, launched with "
        "torchrun): each of the world_size x nnodes ranks takes an equal slice of every batch. "
        "1 on one node: one process, no launcher. "
        "Not part of the SAE's address (like device: same computation, up to float rounding).",
    )
    nnodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Nodes of a data-parallel run, each running world_size processes against a "
        "store every node reaches; world_size x nnodes ranks in all, rank 0 (on node 0) commits. "
        "Not part of the SAE's address.",
    )
    node_rank: int = Field(
        0, ge=0, description="This node's place, 0 .. train.nnodes - 1 (node 0 commits the SAE)."
    )
    rendezvous: str | None = Field(
        None,
        description="HOST:PORT where node 0 meets the others (torchrun's master address and "
        "port; every node gives the same); needed when train.nnodes > 1.",
    )
    data_lanes: int = Field(
        8,
        ge=1,
        le=4096,
        description="Independent streams every batch is drawn from, each reading its own "
        "1/data_lanes of the split (sae_core.storage.loader): a data-parallel rank reads only "
        "its lanes, so world_size x nnodes must divide it. Part of the batch order, hence of "
        "the SAE's address.",
    )

    @model_validator(mode="after")
    def _tokens_or_epochs(self) -> TrainConfig:
        if self.tokens is not None and self.epochs != 1:
            raise ValueError(
                f"train.tokens={self.tokens} and train.epochs={self.epochs} both set the run's "
                "length; set one of them"
            )
        if self.tokens is not None and self.tokens < self.batch_size:
            raise ValueError(
                f"train.tokens={self.tokens} is less than one batch (train.batch_size="
                f"{self.batch_size}); raise train.tokens or lower train.batch_size"
            )
        if self.ema_decay is not None and self.recipe == "budget":
            raise ValueError(
                "train.ema_decay: the budget recipe ships schedule-free Adam's average of the "
                "weights already; drop train.ema_decay or set train.recipe=paper"
            )
        return self

    @property
    def ranks(self) -> int:
        """Data-parallel processes in all: world_size on each of nnodes nodes."""
        return self.world_size * self.nnodes

    @model_validator(mode="after")
    def _batch_splits_over_ranks(self) -> TrainConfig:
        ranks = (
            f"train.world_size={self.world_size}"
            if self.nnodes == 1
            else f"train.world_size={self.world_size} x train.nnodes={self.nnodes} = {self.ranks}"
        )
        if self.batch_size % self.ranks:
            raise ValueError(
                f"{ranks} does not divide train.batch_size={self.batch_size}; choose a "
                "train.batch_size that is a multiple of it (each rank takes an equal slice)"
            )
        if self.data_lanes % self.ranks:
            raise ValueError(
                f"{ranks} does not divide train.data_lanes={self.data_lanes}; set "
                "train.data_lanes to a multiple of it (each rank reads whole lanes; the SAE "
                "then gets a new address, as the batch order changes)"
            )
        return self

    @model_validator(mode="after")
    def _nodes(self) -> TrainConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(
                f"train.node_rank={self.node_rank} is not below train.nnodes={self.nnodes}; "
                f"number the nodes 0 .. {self.nnodes - 1}"
            )
        if self.rendezvous is not None:
            host, _, port = self.rendezvous.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f"train.rendezvous={self.rendezvous!r} is not HOST:PORT; give node 0's "
                    "address and a free port every node reaches, e.g. 10.0.0.1:29500"
                )
        elif self.nnodes > 1:
            raise ValueError(
                f"train.nnodes={self.nnodes} needs train.rendezvous=HOST:PORT: node 0's "
                "address and a free port, the same on every node"
            )
        return self


class EvalConfig(_Strict):
    batch_contexts: int = Field(
        16, ge=1, description="Eval contexts per forward pass (each holds [B, T, vocab] logits)."
    )
    ablation_samples: int = Field(
        128, ge=0, description="Single-latent ablations for ablation sparsity; 0 turns it off."
    )
    ablation_horizon: int = Field(
        16, ge=1, description="Positions from the ablated token on whose logits are compared."
    )
    probe_contexts: int = Field(
        512, ge=0, description="Probe contexts (one per document first); 0 turns probes off."
    )
    probe_tokens: int = Field(8192, ge=1, description="Labelled tokens sampled for token tasks.")
    seed: Seed = Field(0, description="Seed of the ablation and probe samples.")


class SaeBenchConfig(_Strict):
    """SAEBench's offline evaluations (sae_core.evaluation: saebench_core, sparse_probing,
    absorption), a stage after the evaluation; the probe tasks come from the eval section."""

    enabled: bool = Field(True, description="Run the stage; false skips it.")
    decoder_sample: int = Field(
        4096, ge=1, description="Latents whose max decoder cosine is measured (each vs all n)."
    )
    sparse_probe_ks: list[int] = Field(
        [1, 2, 5, 10, 20], description="k of the k-sparse probes; [] turns them off."
    )
    absorption_words: int = Field(
        1024, ge=0, description="Single-token words sampled for absorption; 0 turns it off."
    )
    icl_examples: int = Field(
        10, ge=0, description="In-context examples per first-letter prompt (SAEBench: 10)."
    )
    batch_prompts: int = Field(32, ge=1, description="First-letter prompts per forward pass.")
    max_k: int = Field(10, ge=1, description="Largest k of absorption's main latents.")
    f1_jump: float = Field(0.03, ge=0, description="F1 gain that makes a k+1th main latent.")
    min_probe_f1: float = Field(
        0.6, ge=0, le=1, description="Ground-truth probe F1 a letter needs to be scored."
    )
    min_letters: int = Field(
        20, ge=1, le=26, description="Scored letters needed for an absorption score."
    )
    seed: Seed = Field(
        0, description="Seed of the word sample, the prompts and the decoder sample."
    )

    @field_validator("sparse_probe_ks")
    @classmethod
    def _distinct_ks(cls, ks: list[int]) -> list[int]:
        if ks:
            _check_distinct("saebench.sparse_probe_ks", ks, 1)
        return ks


def _check_distinct(field: str, values: list[int], low: int) -> None:
    """A grid's values: distinct, none below `low` (ValueError naming the field)."""
    if len(set(values)) != len(values) or min(values) < low:
        raise ValueError(f"{field}={values}: give distinct integers >= {low}")


class SweepConfig(_Strict):
    """The grid `saeflow sweep` trains: every (n_latents, k, seed) with k <= n_latents."""

    n_latents: list[int] = Field([1152, 2304, 4608], min_length=1)
    k: list[int] = Field([16, 32, 64], min_length=1)
    seeds: list[Seed] = Field([0], min_length=1, description="Training seeds (train.seed).")
    tokens_exponent: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Train each n on train.tokens x (n / smallest n)^exponent tokens, as tokens to "
        "convergence grow with n (Gao et al.: about 0.6); None: every point trains as train says.",
    )

    @model_validator(mode="after")
    def _valid_grid(self) -> SweepConfig:
        for name, low in (("n_latents", 1), ("k", 1), ("seeds", 0)):
            _check_distinct(f"sweep.{name}", getattr(self, name), low)
        if max(self.k) > min(self.n_latents):
            raise ValueError(
                f"k={self.k} has k > n for n_latents={self.n_latents}; "
                "keep every k <= the smallest n"
            )
        return self


class FrontierConfig(_Strict):
    """What `saeflow frontier` trains beside the dense reference (the sae section): an expander
    per degree and, per degree, a dense SAE with as many decoder values."""

    degrees: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 144, 576],
        min_length=1,
        description="Expander degrees (decoder non-zeros per latent), each in 1..model width.",
    )
    encoder: Literal["untied", "tied"] = Field(
        "tied", description="The expanders' encoder; tied (the paper's) keeps the artifact compact."
    )
    resample_dead: bool = Field(False, description="Resample dead expander latents in-support.")
    matched: bool = Field(True, description="Train the parameter-matched dense SAEs too.")
    seeds: list[Seed] = Field([0], min_length=1, description="Training and mask seeds.")
    full_eval: bool = Field(
        False,
        description="Also run probes and ablation sparsity (the frontier needs CE recovered only).",
    )

    @model_validator(mode="after")
    def _distinct(self) -> FrontierConfig:
        for name, low in (("degrees", 1), ("seeds", 0)):
            _check_distinct(f"frontier.{name}", getattr(self, name), low)
        return self


class LatentsConfig(_Strict):
    """The latent statistics behind `saeflow view` and the explainability metric
    (sae_core.latents.stats), computed in one pass over the eval activations."""

    top_contexts: int = Field(16, ge=1, le=256, description="Top activating contexts per latent.")
    random_contexts: int = Field(
        8, ge=0, le=256, description="Uniformly sampled firing contexts per latent (reservoir)."
    )
    window_before: int = Field(12, ge=0, le=256, description="Tokens shown before the peak.")
    window_after: int = Field(4, ge=0, le=256, description="Tokens shown after the peak.")
    histogram_bins: int = Field(
        32, ge=2, le=1024, description="Bins of each latent's activation histogram (a power of 2)."
    )
    logit_tokens: int = Field(10, ge=1, le=100, description="Logit-lens tokens shown per side.")
    max_ngram: int = Field(
        3, ge=1, le=3, description="Longest n-gram an explanation may be (ending at the peak)."
    )
    batch_tokens: int = Field(
        1024, ge=1, description="Activation rows per chunk (a [chunk, n] dense code matrix)."
    )
    sketch_width: int = Field(
        2**20, ge=2**10, le=2**26, description="Count-min sketch width for n-gram counts."
    )
    seed: Seed = Field(0, description="Seed of the reservoir samples.")

    @model_validator(mode="after")
    def _power_of_two_bins(self) -> LatentsConfig:
        if self.histogram_bins & (self.histogram_bins - 1):
            raise ValueError(
                f"latents.histogram_bins={self.histogram_bins}: choose a power of two, e.g. 32"
            )
        if self.max_ngram > self.window_before + 1:
            raise ValueError(
                f"latents.max_ngram={self.max_ngram} needs latents.window_before >= "
                f"{self.max_ngram - 1}; raise window_before or lower max_ngram"
            )
        return self


class RegistryConfig(_Strict):
    model_name: str = Field("saeflow-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    alias: str = Field("challenger", pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
    experiment: str = Field("saeflow", pattern=r"^[A-Za-z0-9][A-Za-z0-9_. -]{0,99}$")


class PipelineConfig(_Strict):
    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
    store: str | None = Field(
        None,
        description="Store URI: a local directory or s3://bucket/prefix; default $SAEFLOW_HOME/store",
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sae: SAEConfig = SAEConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()
    sweep: SweepConfig = SweepConfig()
    frontier: FrontierConfig = FrontierConfig()
    latents: LatentsConfig = LatentsConfig()
    saebench: SaeBenchConfig = SaeBenchConfig()

    @model_validator(mode="after")
    def _transcoder_hooks(self) -> PipelineConfig:
        transcoder = self.sae.kind in TRANSCODER_KINDS
        if transcoder and self.model.hook_out is None:
            raise ValueError(
                f"sae.kind={self.sae.kind} needs model.hook_out, the hook it reconstructs from "
                "model.hook; set e.g. model.hook=mlp_in.6 model.hook_out=mlp_out.6"
            )
        if not transcoder and self.model.hook_out is not None:
            raise ValueError(
                f"model.hook_out is for transcoders; unset it or set sae.kind=transcoder "
                f"(sae.kind={self.sae.kind} reconstructs model.hook)"
            )
        if transcoder and self.model.hook_out == self.model.hook:
            raise ValueError(
                f"model.hook_out={self.model.hook_out} equals model.hook; a transcoder reads one "
                "hook and reconstructs another (for one hook use sae.kind=topk)"
            )
        if transcoder and self.data.max_norm is not None:
            raise ValueError(
                "data.max_norm drops rows of each hook separately, which would unpair a "
                "transcoder's input and output rows; unset it"
            )
        if transcoder and self.train.ranks > 1:
            raise ValueError(
                f"sae.kind={self.sae.kind} trains in one process; set train.world_size=1 and "
                "train.nnodes=1"
            )
        if transcoder and self.model.compile:
            raise ValueError(
                "model.compile extracts one resid_post hook; a transcoder's pass extracts "
                "model.hook and model.hook_out: set model.compile=false"
            )
        if transcoder and self.saebench.enabled:
            raise ValueError(
                "SAEBench's evaluations score an SAE's reconstruction of model.hook, not a "
                "transcoder's prediction of model.hook_out; set saebench.enabled=false"
            )
        return self

    @field_validator("store")
    @classmethod
    def _store_not_blank(cls, store: str | None) -> str | None:
        if store is not None and not store.strip():
            raise ValueError(
                "empty; give a directory or s3://bucket/prefix, or leave it out for the default"
            )
        return store


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`sae.k=64` -> ("sae.k", 64); the value is read as YAML so numbers and booleans type."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key.strip()):
        raise ConfigError(f"--set '{text}': expected key.path=value, e.g. --set sae.k=64")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except RecursionError:
        raise ConfigError(
            f"--set {key.strip()}: the value is nested too deeply to read; give a flat value"
        ) from None
    except YAML_FAILURES:  # e.g. `!!int abc`: the text itself
        value = raw
    return key.strip(), value


def format_validation_error(err: ValidationError) -> str:
    """One line per failed field: `config error: sae.k: <why>`."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check the spelling against `saeflow config` (the resolved configuration)"
        lines.append(f"config error: {loc}: {msg}")
    return "\n".join(lines)


def build_config(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> PipelineConfig:
    tree = yaml.safe_load(yaml.safe_dump(data)) or {}
    for text in overrides:
        _set_path(tree, *parse_override(text))
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def load_config(
    preset: str = "demo", overrides: list[str] | tuple[str, ...] = (), store: str | None = None
) -> PipelineConfig:
    """A preset by name (sae_core/presets/NAME.yaml) or a path to a YAML file, plus overrides."""
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset '{preset}': choose one of {', '.join(available_presets())} "
            "or give a path to a YAML file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"preset {path}: not UTF-8 text (at byte {err.start}); give a YAML file"
        ) from None
    data = read_yaml(text, f"preset {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path}: expected a mapping of sections at the top level")
    overrides = list(overrides)
    if store is not None and not store.strip():
        raise ConfigError(
            f"--store {store!r}: empty; give a directory or s3://bucket/prefix, or leave "
            "--store out for the default store"
        )
    if store is not None:
        overrides.append(f"store={store}")
    return build_config(data, overrides)
