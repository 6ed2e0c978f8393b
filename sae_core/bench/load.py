"""Loading benchmark: on each store given (local and/or S3), a synthetic activations dataset is
written, then read back sequentially and through the shuffled streaming reader (GB/s,
tokens/s), then a real training run (TopK SAE, `group.run_training`) reads it through
`loader.iter_batches`; the time spent waiting for batches is the data-wait share of step time
(target < 5%), and the process's resident memory is sampled meanwhile (the dataset is larger
than the shuffle buffer).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from sae_core.bench.measure import load_average, timed
from sae_core.bench.options import LoadBench
from sae_core.bench.synthetic import write_synthetic
from sae_core.config import SAEConfig, TrainConfig
from sae_core.storage.loader import iter_batches, read_split
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store


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


def _train_with_timed_data(
    ref: DatasetRef, options: LoadBench, n_latents: int, k: int
) -> dict[str, Any]:
    """A real training run of `options.train_steps` steps fed by iter_batches, timing every
    wait for data."""
    from sae_core.training.group import run_training

    batch, buffer_tokens, steps = options.batch, options.buffer_tokens, options.train_steps
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

    rss_before = _RSS.now()
    with _RSS() as rss:
        run_training(
            options.width,
            sae_cfg,
            train_cfg,
            source,
            options.rows // batch,
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


def _measure_store(uri: str, options: LoadBench, n_latents: int, k: int) -> dict[str, Any]:
    """Write, read, stream and train on a synthetic dataset on one store; removed after."""
    store = Store(uri)
    store.check()
    payload = options.rows * options.width * np.dtype(options.dtype).itemsize
    t0 = time.perf_counter()
    ref = write_synthetic(
        store, "bench-load/acts", options.rows, options.width, options.dtype, options.shard_mb
    )
    write_s = time.perf_counter() - t0
    read_s = timed(lambda: sum(b.num_rows for b in read_split(ref, "train")))
    stream_s = timed(
        lambda: sum(
            len(x)
            for x in iter_batches(
                ref, "train", options.batch, 0, buffer_tokens=options.buffer_tokens
            )
        )
    )
    entry = {
        "uri": uri,
        "write_gb_per_s": round(payload / write_s / 1e9, 3),
        "read_gb_per_s": round(payload / read_s / 1e9, 3),
        "read_tokens_per_s": round(options.rows / read_s),
        "shuffled_gb_per_s": round(payload / stream_s / 1e9, 3),
        "shuffled_tokens_per_s": round(options.rows / stream_s),
        "train": _train_with_timed_data(ref, options, n_latents, k),
        "load_average": load_average(),
    }
    store.rm("bench-load")
    return entry


def bench_load(
    options: LoadBench,
    stores: dict[str, str],
    *,
    n_latents: int = 4608,
    k: int = 32,
    verbose: bool = True,
) -> dict[str, Any]:
    """For each named store URI: write, read and train (a TopK SAE of `n_latents` and `k`) on a
    synthetic dataset (see module)."""
    itemsize = np.dtype(options.dtype).itemsize
    result: dict[str, Any] = {
        "rows": options.rows,
        "width": options.width,
        "dtype": options.dtype,
        "dataset_mb": round(options.rows * options.width * itemsize / 2**20, 1),
        "buffer_tokens": options.buffer_tokens,
        "buffer_mb": round(options.buffer_tokens * options.width * itemsize / 2**20, 1),
        "batch": options.batch,
        "threads": torch.get_num_threads(),
        "stores": {},
    }
    for name, uri in stores.items():
        entry = result["stores"][name] = _measure_store(uri, options, n_latents, k)
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
