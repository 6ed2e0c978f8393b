"""The `data` section: the corpus, its contexts and the activation shards extracted from them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sae_core.config.common import Seed, Strict


class DataConfig(Strict):
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
