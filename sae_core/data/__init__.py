"""The data an SAE learns from: demo assets (SmolLM2-135M, the Brown corpus), corpora cut into
token contexts, Hugging Face models and their hook points, activation extraction to Parquet
shards, and the per-shard summaries that validation checks.

May import: storage and the leaves.
"""
