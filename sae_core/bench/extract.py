"""Extraction benchmark: tokens/s of `activations.extract_hooks` (forward to the deepest hook,
rows, Parquet shards) against a bare forward of the same model truncated after that hook's block
and against a full-depth forward (logits), over the same token batches, interleaved per repeat
(the pair's order alternating). ratio = extraction / bare, the median of the per-repeat ratios;
the target is >= 0.9.
"""

from __future__ import annotations

import io
import statistics
import tempfile
from contextlib import ExitStack
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_core.bench.measure import load_average, timed
from sae_core.bench.options import ExtractBench
from sae_core.config import DataConfig
from sae_core.data.activations import extract_hooks
from sae_core.data.models import HookPoint, load_model, truncated
from sae_core.data.tokens import TOKENS_SCHEMA
from sae_core.storage.manifests import ActivationsManifest, TokensManifest, TokensSplit
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store


def _write_tokens(store: Store, path: str, contexts: np.ndarray, vocab: int) -> DatasetRef:
    """A tokens dataset of `contexts: [C, T]` ids (train) plus one context (eval)."""
    T = contexts.shape[1]
    with store.writing(path) as writer:
        splits = {}
        for split, ids in (("train", contexts), ("eval", contexts[:1])):
            table = pa.table(
                {
                    "tokens": pa.ListArray.from_arrays(
                        pa.array(np.arange(len(ids) + 1, dtype=np.int32) * T),
                        pa.array(ids.reshape(-1).astype(np.int32)),
                    ),
                    "context_id": pa.array(np.arange(len(ids), dtype=np.int64)),
                    "doc_id": pa.array(["bench"] * len(ids)),
                },
                schema=TOKENS_SCHEMA,
            )
            buf = io.BytesIO()
            pq.write_table(table, buf)
            writer.write_bytes(f"{split}.parquet", buf.getvalue())
            splits[split] = TokensSplit(contexts=len(ids), tokens=int(ids.size))
        writer.manifest = TokensManifest(context_len=T, vocab_size=vocab, splits=splits)
    return DatasetRef(store=store.uri, path=path, fingerprint="bench")


def bench_extract(
    options: ExtractBench,
    *,
    dtype: str = "float32",
    store: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Extraction tokens/s against the bare truncated forward and the full forward (see module),
    the model's weights in `dtype`.

    Shards go to `store` (default: a scratch directory), `options.shard_mb` each so that the run
    writes several.
    """
    from sae_core.data.assets import resolve_model_path

    hooks, context_len, repeats = options.hook, options.context_len, options.repeats
    loaded = load_model(resolve_model_path(options.model), dtype, options.device)
    model = loaded.model
    dev = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, vocab, size=(max(1, options.tokens // context_len), context_len))
    depth = max(HookPoint.parse(h).layer for h in hooks) + 1
    per_batch = max(1, options.batch_tokens // context_len)
    # The same batches the extraction runs: the train contexts, then the one eval context.
    batches = [
        torch.from_numpy(contexts[i : i + per_batch]) for i in range(0, len(contexts), per_batch)
    ]
    batches.append(torch.from_numpy(contexts[:1]))
    n_tokens = sum(b.numel() for b in batches)
    data_cfg = DataConfig(
        batch_tokens=options.batch_tokens,
        shard_mb=options.shard_mb,
        storage_dtype=options.storage_dtype,
    )

    def bare() -> None:
        with torch.inference_mode(), truncated(model, depth) as base:
            for ids in batches:
                base(input_ids=ids.to(dev), use_cache=False)

    def full() -> None:
        with torch.inference_mode():
            for ids in batches:
                model(input_ids=ids.to(dev), use_cache=False)

    with tempfile.TemporaryDirectory(prefix="saeflow-bench-") as scratch:
        target = Store(store or scratch)
        tokens_ref = _write_tokens(target, "bench-extract/tokens", contexts, vocab)

        def extract(run: int) -> None:
            with ExitStack() as stack:
                writers = [
                    stack.enter_context(target.writing(f"bench-extract/acts-{run}-{i}"))
                    for i in range(len(hooks))
                ]
                extract_hooks(model, tokens_ref, data_cfg, hooks, writers, progress=False)

        bare()  # warm-up: allocator, kernels, page cache of the weights
        times: dict[str, list[float]] = {"bare": [], "extract": [], "full": []}
        for run in range(repeats):
            # Alternate which of the pair goes first, so a trend in the load favours neither.
            pair = [("bare", bare), ("extract", lambda run=run: extract(run))]
            for key, fn in pair if run % 2 == 0 else pair[::-1]:
                times[key].append(timed(fn))
            times["full"].append(timed(full))
        first = DatasetRef(store=target.uri, path="bench-extract/acts-0-0", fingerprint="bench")
        shards = len(first.manifest(ActivationsManifest).splits["train"].shards)
        for run in range(repeats):
            for i in range(len(hooks)):
                target.rm(f"bench-extract/acts-{run}-{i}")
        target.rm("bench-extract/tokens")

    def tps(key: str) -> float:
        return n_tokens / statistics.median(times[key])

    result = {
        "model": options.model,
        "hooks": hooks,
        "layers_run": depth,
        "layers_total": int(getattr(model.config, "num_hidden_layers", 0)) or None,
        "tokens_per_pass": n_tokens,
        "batch_tokens": options.batch_tokens,
        "storage_dtype": options.storage_dtype,
        "shard_mb": options.shard_mb,
        "train_shards_written": shards,
        "repeats": repeats,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "extract_tokens_per_s": round(tps("extract"), 1),
        "bare_truncated_tokens_per_s": round(tps("bare"), 1),
        "full_depth_tokens_per_s": round(tps("full"), 1),
        # Per repeat, extraction against the bare pass timed just before it; load from other
        # processes hits both sides of a pair alike.
        "ratio_vs_bare": round(
            statistics.median(b / e for b, e in zip(times["bare"], times["extract"], strict=True)),
            3,
        ),
        "ratio_vs_full": round(
            statistics.median(f / e for f, e in zip(times["full"], times["extract"], strict=True)),
            3,
        ),
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "load_average": load_average(),
    }
    if verbose:
        print(
            f"{options.model} to {', '.join(hooks)} ({depth} of {result['layers_total']} layers), "
            f"{n_tokens} tokens x {repeats} on {dev} ({result['threads']} threads)\n"
            f"  extraction {result['extract_tokens_per_s']:.0f} tokens/s   "
            f"bare truncated forward {result['bare_truncated_tokens_per_s']:.0f}   "
            f"full forward {result['full_depth_tokens_per_s']:.0f}\n"
            f"  ratio vs bare {result['ratio_vs_bare']:.3f} (target >= 0.9)   "
            f"vs full {result['ratio_vs_full']:.2f}   load average {result['load_average']}"
        )
    return result
