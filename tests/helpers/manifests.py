"""One manifest of every kind, with the figures of a tiny run (sae_core.storage.manifests)."""

from __future__ import annotations

from sae_core.storage.manifests import (
    ActivationsManifest,
    ActivationsShard,
    ActivationsSplit,
    BaselineManifest,
    DatasetLink,
    EvaluationManifest,
    LatentStatsManifest,
    Manifest,
    Normalization,
    ProbeSetManifest,
    ReportManifest,
    SaeManifest,
    StorageFigures,
    TokensManifest,
    TokensSplit,
    ValidationManifest,
)

STORE = "/tmp/store"


def example_sae(**fields) -> SaeManifest:
    """A topk SAE's manifest (d=64, n=256, k=8); `fields` replace its values."""
    values = {
        "schema_version": 1,
        "fingerprint": "22f7efdaf4780650",
        "activations": f"{STORE}/activations/a09e9accfc85f580",
        "sae_kind": "topk",
        "d": 64,
        "n": 256,
        "k": 8,
        "k_aux": 32,
        "normalization": Normalization(mode="per_token", global_scale=1.0),
        "tokens_seen": 3840,
        "steps": 15,
        "lr": 0.0016,
        "final_nmse": 0.87,
        "dead_fraction": 0.0,
        "dead_fraction_run": 0.0,
        "weights": "last",
        "storage": StorageFigures(
            decoder_values=16384,
            dense_decoder_values=16384,
            compression=1.0,
            artifact_bytes=133072,
            dense_artifact_bytes=133072,
        ),
        "resumed_from_tokens": 0,
    }
    return SaeManifest(**values | fields)


def examples() -> list[Manifest]:
    """One manifest per kind (the three report kinds each), as their writers build them."""
    tokens = f"{STORE}/tokens/46ba6299cbf81dd9"
    shard = ActivationsShard(
        name="train/shard-00000.parquet",
        rows=1488,
        bytes=407112,
        norm_sum=358.86,
        norm_max=0.39,
        contexts=(0, 48),
    )
    return [
        TokensManifest(
            schema_version=1,
            fingerprint="46ba6299cbf81dd9",
            context_len=32,
            tokenizer="tiny-llama",
            corpus="tiny-corpus",
            text_column="text",
            seed=0,
            vocab_size=211,
            eos_token_id=None,
            corpus_documents=60,
            documents_tokenized=60,
            stream_tokens=19770,
            splits={
                "eval": TokensSplit(contexts=16, tokens=512, bytes=1967),
                "train": TokensSplit(contexts=128, tokens=4096, bytes=5602),
            },
        ),
        ActivationsManifest(
            schema_version=2,
            fingerprint="a09e9accfc85f580",
            model="tiny-llama",
            model_dtype="float32",
            hook="resid_post.2",
            dtype="float32",
            width=64,
            context_len=32,
            batch_tokens=2048,
            shard_rows=1500,
            contexts_per_shard=48,
            skip_first_position=True,
            max_norm=None,
            tokens=DatasetLink(uri=tokens, fingerprint="46ba6299cbf81dd9"),
            splits={
                "train": ActivationsSplit(
                    rows=1488,
                    dropped_max_norm=0,
                    norm_mean=0.24,
                    norm_max=0.39,
                    shards=[shard],
                )
            },
        ),
        example_sae(batch_topk_threshold=0.25),
        BaselineManifest(
            fingerprint="1dda6c29942e8641",
            tokens=tokens,
            hook="resid_post.2",
            contexts=16,
            ce_sums={"mean": 3008.98, "zero": 2994.03},
            terms=480,
        ),
        ProbeSetManifest(
            fingerprint="ab50df5b17896a3a",
            corpus="tiny-corpus",
            hook="resid_post.2",
            contexts=512,
            token_sample=0,
            genres=["fiction", "news", "science"],
            pos_classes=["noun", "verb"],
        ),
        EvaluationManifest(
            fingerprint="10501aeeeef3a07b",
            sae=f"{STORE}/sae/22f7efdaf4780650",
            n_latents=256,
            k=8,
            tokens=tokens,
            baseline=f"{STORE}/baseline/1dda6c29942e8641",
            probe_set=None,
            metrics={"nmse": 0.61, "ce_loss_recovered": float("nan"), "eval_tokens": 496.0},
            seconds={"total": 0.08},
        ),
        LatentStatsManifest(
            fingerprint="bfa39019558e49cd",
            sae=f"{STORE}/sae/22f7efdaf4780650",
            sae_kind="topk",
            d=64,
            k=8,
            n_latents=256,
            model="tiny-llama",
            hook="resid_post.2",
            activations=f"{STORE}/activations/a09e9accfc85f580",
            metrics={"explain/f1_mean": 0.13, "explain/scored_latents": 223.0},
            seconds=1.1,
        ),
        *(
            ReportManifest(kind=kind, fingerprint="52be29d3a67e7f7b", files=["report.md"])
            for kind in ReportManifest.kinds()
        ),
        ValidationManifest(
            fingerprint="a09e9accfc85f580",
            dataset=f"{STORE}/activations/a09e9accfc85f580",
            passed=False,
            shards=4,
            rows=4464,
            failures=["train/shard-00001.parquet: no NaN/inf values: 1 of 1488 rows"],
            docs=f"file://{STORE}/validation/a09e9accfc85f580/docs/index.html",
        ),
    ]
