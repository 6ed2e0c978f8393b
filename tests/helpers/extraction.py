"""The data section of the extraction tests on the tiny model."""

from __future__ import annotations

# 640 training and 160 eval tokens in contexts of 16, forward batches of 128 tokens, shards of
# 100 rows: several shards per split, in seconds.
TINY_DATA = {
    "corpus": "tiny",
    "context_len": 16,
    "train_tokens": 640,
    "eval_tokens": 160,
    "seed": 0,
    "batch_tokens": 128,
    "shard_rows": 100,
}
