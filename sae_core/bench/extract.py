"""Extraction benchmark: tokens/s of `activations.extract_hooks` (forward to the deepest hook,
rows, Parquet shards) against a bare forward of the same model truncated after that hook's block
and against a full-depth forward (logits), over the same token batches, interleaved per repeat
(the pair's order alternating). ratio = extraction / bare, the median of the per-repeat ratios;
the target is >= 0.9.

The forward's FLOP limit: the truncated forward's matmul FLOPs per token (`forward_flops`)
against the rate this machine reaches on the forward's largest GEMM (a batch of tokens times
the MLP's up-projection) in the model's dtype (`gemm_rate`). `ratio_vs_flop_limit` = extraction
tokens/s over that limit: near 1, only faster arithmetic (bf16 units, a GPU) goes faster.
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
from sae_core.data.compiled import CompiledForward
from sae_core.data.models import HookPoint, load_model, truncated
from sae_core.data.tokens import TOKENS_SCHEMA
from sae_core.sae import kernels
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


def forward_flops(config: Any, layers: int, context_len: int) -> float:
    """Multiply-add FLOPs per token of a Llama-style decoder's first `layers` blocks: the
    attention and MLP projections, and the attention scores and mixing over, on average,
    half a causal context."""
    d = config.hidden_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * (d // heads)
    projections = d * (d + 2 * kv) + d * d + 3 * d * config.intermediate_size
    attention = 2 * (context_len / 2) * d
    return 2.0 * layers * (projections + attention)


def gemm_rate(tokens: int, config: Any, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of [tokens, d] @ [d, intermediate] in `dtype`: the median of 5 after a warm-up."""
    a = torch.randn(tokens, config.hidden_size, device=device).to(dtype)
    b = torch.randn(config.hidden_size, config.intermediate_size, device=device).to(dtype)
    a @ b
    seconds = statistics.median(timed(lambda: a @ b) for _ in range(5))
    return 2.0 * tokens * config.hidden_size * config.intermediate_size / seconds


def bench_extract(
    options: ExtractBench, *, store: str | None = None, verbose: bool = True
) -> dict[str, Any]:
    """Extraction tokens/s against the bare truncated forward, the full forward and the
    forward's FLOP limit (see module), the model's weights in `options.dtype`.

    Shards go to `store` (default: a scratch directory), `options.shard_mb` each so that the run
    writes several.
    """
    from sae_core.data.assets import resolve_model_path

    hooks, context_len, repeats = options.hook, options.context_len, options.repeats
    loaded = load_model(resolve_model_path(options.model), options.dtype, options.device)
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

    compiled = CompiledForward(model, hooks, per_batch) if options.compile else None

    def bare() -> None:
        if compiled is not None:
            with torch.inference_mode():
                for ids in batches:
                    compiled(ids.to(dev))
            return
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
                extract_hooks(
                    model, tokens_ref, data_cfg, hooks, writers, progress=False, forward=compiled
                )

        warm_up = timed(bare)  # allocator, kernels, page cache of the weights; the compilation
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

    flops = forward_flops(model.config, depth, context_len)
    rate = gemm_rate(options.batch_tokens, model.config, next(model.parameters()).dtype, dev)

    result = {
        "model": options.model,
        "hooks": hooks,
        "layers_run": depth,
        "layers_total": int(getattr(model.config, "num_hidden_layers", 0)) or None,
        "tokens_per_pass": n_tokens,
        "batch_tokens": options.batch_tokens,
        "dtype": options.dtype,
        "compile": options.compile,
        "warm_up_seconds": round(warm_up, 1),
        "storage_dtype": options.storage_dtype,
        "shard_mb": options.shard_mb,
        "train_shards_written": shards,
        "repeats": repeats,
        "device": str(dev),
        # What an SAE step on this device takes (extraction itself runs none): "triton" on CUDA
        # with triton installed, so a node's results say whether its kernels can run there.
        "sparse_kernels": kernels.sparse_path(dev),
        "threads": torch.get_num_threads(),
        "extract_tokens_per_s": round(tps("extract"), 1),
        "bare_truncated_tokens_per_s": round(tps("bare"), 1),
        "full_depth_tokens_per_s": round(tps("full"), 1),
        "forward_flops_per_token": round(flops),
        "gemm_flops_per_s": round(rate),
        "flop_limit_tokens_per_s": round(rate / flops, 1),
        "ratio_vs_flop_limit": round(tps("extract") * flops / rate, 3),
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
            f"{n_tokens} tokens x {repeats} on {dev} in {options.dtype} "
            f"({result['threads']} threads)\n"
            f"  extraction {result['extract_tokens_per_s']:.0f} tokens/s   "
            f"bare truncated forward {result['bare_truncated_tokens_per_s']:.0f}   "
            f"full forward {result['full_depth_tokens_per_s']:.0f}\n"
            f"  ratio vs bare {result['ratio_vs_bare']:.3f} (target >= 0.9)   "
            f"vs full {result['ratio_vs_full']:.2f}   load average {result['load_average']}\n"
            f"  FLOP limit {result['flop_limit_tokens_per_s']:.0f} tokens/s "
            f"({flops / 1e6:.0f} MFLOP/token at "
            f"{rate / 1e9:.0f} GFLOP/s)   "
            f"ratio vs limit {result['ratio_vs_flop_limit']:.2f}"
        )
    return result
