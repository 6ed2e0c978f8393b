"""Data-plane benchmarks: extraction against the bare forward pass, and loading for training.

bench_extract: tokens/s of `activations.extract_hooks` (forward to the deepest hook, rows, Parquet
shards) against a bare forward of the same model truncated after that
hook's block and against a full-depth forward (logits), over the same token batches, interleaved
per repeat (the pair's order alternating). ratio = extraction / bare, the median of the per-repeat
ratios; the target is >= 0.9.

bench_load: on each store given (local and/or S3), a synthetic activations dataset is written,
then read back sequentially and through the shuffled streaming reader (GB/s, tokens/s), then a
real training run (TopK SAE, `train.run_training`) reads it through `loader.iter_batches`; the
time spent waiting for batches is the data-wait share of step time (target < 5%), and the
process's resident memory is sampled meanwhile (the dataset is larger than the shuffle buffer).

bench_group: on each store given, wall time of training several SAEs one after another (each
reading the data itself) against as one group reading it once (`train.train_group`).
"""

from __future__ import annotations

import io
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_core.config import DataConfig, SAEConfig, TrainConfig
from sae_core.data.activations import extract_hooks, shard_rows, write_shard
from sae_core.data.models import HookPoint, load_model, truncated
from sae_core.data.tokens import TOKENS_SCHEMA
from sae_core.storage.layout import STORAGE_SCHEMA
from sae_core.storage.loader import iter_batches, read_split
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store


def _load_average() -> float:
    return round(os.getloadavg()[0], 2)


# Extraction ----------------------------------------------------------------------------------
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
            splits[split] = {"contexts": len(ids), "tokens": ids.size}
        writer.manifest = {
            "kind": "tokens",
            "context_len": T,
            "vocab_size": vocab,
            "splits": splits,
        }
    return DatasetRef(store=store.uri, path=path, fingerprint="bench")


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_extract(
    model_path: str,
    hooks: list[str],
    tokens: int = 8192,
    context_len: int = 64,
    batch_tokens: int = 2048,
    shard_mb: float = 4.0,
    storage_dtype: str = "float32",
    dtype: str = "float32",
    repeats: int = 3,
    device: str = "auto",
    store: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Extraction tokens/s against the bare truncated forward and the full forward (see module).

    Shards go to `store` (default: a scratch directory), `shard_mb` each so that the run writes
    several.
    """
    from sae_core.data.assets import resolve_model_path

    loaded = load_model(resolve_model_path(model_path), dtype, device)
    model = loaded.model
    dev = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    rng = np.random.default_rng(0)
    contexts = rng.integers(0, vocab, size=(max(1, tokens // context_len), context_len))
    depth = max(HookPoint.parse(h).layer for h in hooks) + 1
    per_batch = max(1, batch_tokens // context_len)
    # The same batches the extraction runs: the train contexts, then the one eval context.
    batches = [
        torch.from_numpy(contexts[i : i + per_batch]) for i in range(0, len(contexts), per_batch)
    ]
    batches.append(torch.from_numpy(contexts[:1]))
    n_tokens = sum(b.numel() for b in batches)
    data_cfg = DataConfig(batch_tokens=batch_tokens, shard_mb=shard_mb, storage_dtype=storage_dtype)

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
                times[key].append(_timed(fn))
            times["full"].append(_timed(full))
        shards = len(target.manifest("bench-extract/acts-0-0")["splits"]["train"]["shards"])
        for run in range(repeats):
            for i in range(len(hooks)):
                target.rm(f"bench-extract/acts-{run}-{i}")
        target.rm("bench-extract/tokens")

    def tps(key: str) -> float:
        return n_tokens / statistics.median(times[key])

    result = {
        "model": model_path,
        "hooks": hooks,
        "layers_run": depth,
        "layers_total": int(getattr(model.config, "num_hidden_layers", 0)) or None,
        "tokens_per_pass": n_tokens,
        "batch_tokens": batch_tokens,
        "storage_dtype": storage_dtype,
        "shard_mb": shard_mb,
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
        "load_average": _load_average(),
    }
    if verbose:
        print(
            f"{model_path} to {', '.join(hooks)} ({depth} of {result['layers_total']} layers), "
            f"{n_tokens} tokens x {repeats} on {dev} ({result['threads']} threads)\n"
            f"  extraction {result['extract_tokens_per_s']:.0f} tokens/s   "
            f"bare truncated forward {result['bare_truncated_tokens_per_s']:.0f}   "
            f"full forward {result['full_depth_tokens_per_s']:.0f}\n"
            f"  ratio vs bare {result['ratio_vs_bare']:.3f} (target >= 0.9)   "
            f"vs full {result['ratio_vs_full']:.2f}   load average {result['load_average']}"
        )
    return result


# Loading -------------------------------------------------------------------------------------
class _RSS:
    """Samples this process's resident memory every 20 ms while running; keeps the peak."""

    def __init__(self) -> None:
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> _RSS:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def write_synthetic(
    store: Store, path: str, rows: int, width: int, dtype: str, shard_mb: float, seed: int = 0
) -> DatasetRef:
    """A committed activations dataset of `rows` Gaussian rows (train split; eval: 1 shard of
    1024), written as the extraction writes shards. Memory: one shard at a time."""
    rng = np.random.default_rng(seed)
    per_shard = shard_rows(DataConfig(shard_mb=shard_mb), width, dtype)
    schema = STORAGE_SCHEMA(width, dtype)
    splits = {}
    with store.writing(path) as writer:
        for split, n in (("train", rows), ("eval", 1024)):
            shards = []
            for index, start in enumerate(range(0, n, per_shard)):
                m = min(per_shard, n - start)
                x = rng.standard_normal((m, width), dtype=np.float32)
                columns = {
                    "activation": x.astype(dtype, copy=False),
                    "sequence": np.arange(start, start + m, dtype=np.int64),
                    "position": np.ones(m, np.int32),
                    "token_id": np.zeros(m, np.int32),
                    "norm": np.linalg.norm(x, axis=1),
                }
                name = f"{split}/shard-{index:05d}.parquet"
                shards.append(write_shard(writer, name, [columns], schema))
            splits[split] = {"rows": n, "shards": shards}
        writer.manifest = {
            "kind": "activations",
            "schema_version": 1,
            "width": width,
            "dtype": dtype,
            "splits": splits,
        }
    return DatasetRef(store=store.uri, path=path, fingerprint="bench", rows=rows)


def _train_with_timed_data(
    ref: DatasetRef, width: int, batch: int, steps: int, buffer_tokens: int, n_latents: int, k: int
) -> dict[str, Any]:
    """A real training run of `steps` steps fed by iter_batches, timing every wait for data."""
    from sae_core.training.group import run_training

    waits: list[float] = []
    started: list[float] = []  # when training asked for its first batch (after the SAE's init)
    sae_cfg = SAEConfig(n_latents=n_latents, k=k, b_pre_init="mean")
    train_cfg = TrainConfig(batch_size=batch, seed=0, device="cpu")

    def source(epoch: int, start: int) -> Iterator[torch.Tensor]:
        started.append(time.perf_counter())
        batches = iter_batches(ref, "train", batch, 0, epoch, start, buffer_tokens=buffer_tokens)
        while True:
            t0 = time.perf_counter()
            x = next(batches, None)
            waits.append(time.perf_counter() - t0)
            if x is None:
                return
            yield x

    def init_sample() -> torch.Tensor:
        return next(iter_batches(ref, "train", 8192, 1, 0, 0, buffer_tokens=buffer_tokens))

    rows = ref.rows
    rss_before = _RSS.now()
    with _RSS() as rss:
        run_training(
            width,
            sae_cfg,
            train_cfg,
            source,
            rows // batch,
            init_sample,
            progress=False,
            stop_after_steps=steps,
        )
        total = time.perf_counter() - started[0]
    first = waits[0]  # the buffer's first fill: once per epoch, not per step
    steady = total - first
    return {
        "steps": steps,
        "step_ms": round(steady / steps * 1e3, 1),
        "first_batch_s": round(first, 3),
        "data_wait_share": round(sum(waits[1:]) / steady, 4),
        "data_wait_share_with_first_fill": round(sum(waits) / total, 4),
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_peak_mb": round(rss.peak / 2**20, 1),
        "rss_growth_mb": round((rss.peak - rss_before) / 2**20, 1),
    }


def bench_load(
    stores: dict[str, str],
    rows: int = 2**19,
    width: int = 576,
    dtype: str = "float32",
    batch: int = 4096,
    buffer_tokens: int = 2**16,
    shard_mb: float = 128.0,
    train_steps: int = 30,
    n_latents: int = 4608,
    k: int = 32,
    verbose: bool = True,
) -> dict[str, Any]:
    """For each named store URI: write, read and train on a synthetic dataset (see module)."""
    payload = rows * width * np.dtype(dtype).itemsize
    result: dict[str, Any] = {
        "rows": rows,
        "width": width,
        "dtype": dtype,
        "dataset_mb": round(payload / 2**20, 1),
        "buffer_tokens": buffer_tokens,
        "buffer_mb": round(buffer_tokens * width * np.dtype(dtype).itemsize / 2**20, 1),
        "batch": batch,
        "threads": torch.get_num_threads(),
        "stores": {},
    }
    for name, uri in stores.items():
        store = Store(uri)
        store.check()
        path = "bench-load/acts"
        t0 = time.perf_counter()
        ref = write_synthetic(store, path, rows, width, dtype, shard_mb)
        write_s = time.perf_counter() - t0
        read_s = _timed(lambda ref=ref: sum(b.num_rows for b in read_split(ref, "train")))
        stream_s = _timed(
            lambda ref=ref: sum(
                len(x) for x in iter_batches(ref, "train", batch, 0, buffer_tokens=buffer_tokens)
            )
        )
        entry = {
            "uri": uri,
            "write_gb_per_s": round(payload / write_s / 1e9, 3),
            "read_gb_per_s": round(payload / read_s / 1e9, 3),
            "read_tokens_per_s": round(rows / read_s),
            "shuffled_gb_per_s": round(payload / stream_s / 1e9, 3),
            "shuffled_tokens_per_s": round(rows / stream_s),
            "train": _train_with_timed_data(
                ref, width, batch, train_steps, buffer_tokens, n_latents, k
            ),
            "load_average": _load_average(),
        }
        store.rm("bench-load")
        result["stores"][name] = entry
        if verbose:
            t = entry["train"]
            print(
                f"{name} ({uri}): {result['dataset_mb']:.0f} MiB, buffer {result['buffer_mb']:.0f} MiB\n"
                f"  write {entry['write_gb_per_s']:.2f} GB/s   read {entry['read_gb_per_s']:.2f} GB/s "
                f"({entry['read_tokens_per_s']:,} tokens/s)   shuffled stream "
                f"{entry['shuffled_gb_per_s']:.2f} GB/s ({entry['shuffled_tokens_per_s']:,} tokens/s)\n"
                f"  training: step {t['step_ms']:.0f} ms, data wait {100 * t['data_wait_share']:.2f}% "
                f"of step time (first fill {t['first_batch_s']:.2f} s), RSS +{t['rss_growth_mb']:.0f} MiB "
                f"(peak {t['rss_peak_mb']:.0f} MiB)   load average {entry['load_average']}"
            )
    return result


# Group training ------------------------------------------------------------------------------
def _saving(seconds: dict[str, list[float]]) -> float:
    """1 - group / one by one, on the medians."""
    return round(
        1 - statistics.median(seconds["group"]) / statistics.median(seconds["one_by_one"]), 3
    )


def bench_group(
    stores: dict[str, str],
    points: list[tuple[int, int]],
    rows: int = 2**17,
    width: int = 576,
    dtype: str = "float32",
    batch: int = 4096,
    shard_mb: float = 128.0,
    repeats: int = 1,
    verbose: bool = True,
) -> dict[str, Any]:
    """For each named store URI: on a synthetic dataset, wall seconds to train the TopK SAEs of
    `points` [(n, k)] one after another (each reading the data itself, as a per-point sweep
    did) against as one group (`train.train_group`: one read for all), one epoch each, after
    an untimed warm-up, the order alternating per repeat; wall and process CPU seconds (all
    threads: the loader's too); the weights are checked identical."""
    from sae_core.training.group import GroupMember
    from sae_core.training.train import train_group

    members = [
        GroupMember(SAEConfig(n_latents=n, k=k), TrainConfig(batch_size=batch, device="cpu"))
        for n, k in points
    ]
    result: dict[str, Any] = {
        "rows": rows,
        "width": width,
        "dtype": dtype,
        "batch": batch,
        "points": points,
        "threads": torch.get_num_threads(),
        "stores": {},
    }
    for name, uri in stores.items():
        store = Store(uri)
        store.check()
        ref = write_synthetic(store, "bench-group/acts", rows, width, dtype, shard_mb)
        train_group(ref, members, store, progress=False)  # warm-up, untimed: first-touch costs
        runs: dict[str, list[float]] = {way: [] for way in ("one_by_one", "group")}
        cpu: dict[str, list[float]] = {way: [] for way in runs}
        loads = [_load_average()]
        for repeat in range(repeats):
            for way in list(runs)[:: 1 if repeat % 2 == 0 else -1]:
                start, start_cpu = time.perf_counter(), time.process_time()
                if way == "group":
                    grouped = train_group(ref, members, store, progress=verbose)
                else:
                    alone = [train_group(ref, [m], store, progress=verbose)[0] for m in members]
                runs[way].append(time.perf_counter() - start)
                cpu[way].append(time.process_time() - start_cpu)
                loads.append(_load_average())
        same = all(
            torch.equal(p, q)
            for a, g in zip(alone, grouped, strict=True)
            for p, q in zip(a.sae.parameters(), g.sae.parameters(), strict=True)
        )
        store.rm("bench-group")
        entry = {
            "uri": uri,
            **{f"{way}_s": [round(s, 2) for s in secs] for way, secs in runs.items()},
            **{f"{way}_cpu_s": [round(s, 2) for s in secs] for way, secs in cpu.items()},
            "saving": _saving(runs),
            "cpu_saving": _saving(cpu),
            "identical_weights": same,
            "load_average": loads,
        }
        result["stores"][name] = entry
        if verbose:
            print(
                f"{name} ({uri}): {len(points)} SAEs {points}, {rows} rows x {width} {dtype}\n"
                f"  one by one {entry['one_by_one_s']} s (CPU {entry['one_by_one_cpu_s']} s)   "
                f"group {entry['group_s']} s (CPU {entry['group_cpu_s']} s)\n"
                f"  saving (medians): wall {100 * entry['saving']:.1f}%, CPU "
                f"{100 * entry['cpu_saving']:.1f}%   identical weights: {same}   "
                f"load average {loads}"
            )
    return result
