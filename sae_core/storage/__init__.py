"""Where data lives and how it is named: the store (a local directory or s3://) with atomic
commits (data first, manifest last), dataset references, content fingerprints (local files by
content, their digests remembered in the state directory), the typed manifests, the Parquet
activation layout and its streaming loader, cross-process locks, the lineage of a trained SAE,
and injected faults for the reliability tests.

May import: the leaves (errors, env, config). Nothing here knows what an SAE or a model is.
"""
