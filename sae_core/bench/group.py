"""Group-training benchmark: on each store given, wall time of training several SAEs one after
another (each reading the data itself) against as one group reading it once
(`train.train_group`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from sae_core.bench.measure import load_average
from sae_core.bench.options import GroupBench
from sae_core.bench.synthetic import write_synthetic
from sae_core.config import SAEConfig, TrainConfig
from sae_core.storage.store import Store


def _saving(seconds: dict[str, list[float]]) -> float:
    """1 - group / one by one, on the medians."""
    return round(
        1 - statistics.median(seconds["group"]) / statistics.median(seconds["one_by_one"]), 3
    )


def _time_store(uri: str, options: GroupBench, verbose: bool) -> dict[str, Any]:
    """Both ways, `options.repeats` times, on a synthetic dataset on one store; removed after."""
    from sae_core.training.group import GroupMember
    from sae_core.training.train import train_group

    members = [
        GroupMember(
            SAEConfig(n_latents=n, k=options.k), TrainConfig(batch_size=options.batch, device="cpu")
        )
        for n in options.n
    ]
    store = Store(uri)
    store.check()
    ref = write_synthetic(
        store, "bench-group/acts", options.rows, options.width, options.dtype, options.shard_mb
    )
    train_group(ref, members, store, progress=False)  # warm-up, untimed: first-touch costs
    runs: dict[str, list[float]] = {way: [] for way in ("one_by_one", "group")}
    cpu: dict[str, list[float]] = {way: [] for way in runs}
    loads = [load_average()]
    for repeat in range(options.repeats):
        for way in list(runs)[:: 1 if repeat % 2 == 0 else -1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            if way == "group":
                grouped = train_group(ref, members, store, progress=verbose)
            else:
                alone = [train_group(ref, [m], store, progress=verbose)[0] for m in members]
            runs[way].append(time.perf_counter() - start)
            cpu[way].append(time.process_time() - start_cpu)
            loads.append(load_average())
    same = all(
        torch.equal(p, q)
        for a, g in zip(alone, grouped, strict=True)
        for p, q in zip(a.sae.parameters(), g.sae.parameters(), strict=True)
    )
    store.rm("bench-group")
    return {
        "uri": uri,
        **{f"{way}_s": [round(s, 2) for s in secs] for way, secs in runs.items()},
        **{f"{way}_cpu_s": [round(s, 2) for s in secs] for way, secs in cpu.items()},
        "saving": _saving(runs),
        "cpu_saving": _saving(cpu),
        "identical_weights": same,
        "load_average": loads,
    }


def bench_group(
    options: GroupBench, stores: dict[str, str], *, verbose: bool = True
) -> dict[str, Any]:
    """For each named store URI: on a synthetic dataset, wall seconds to train TopK SAEs of
    `options.n` latents (k each) one after another (each reading the data itself, as a
    per-point sweep did) against as one group (`train.train_group`: one read for all), one
    epoch each, after an untimed warm-up, the order alternating per repeat; wall and process
    CPU seconds (all threads: the loader's too); the weights are checked identical."""
    points = [(n, options.k) for n in options.n]
    result: dict[str, Any] = {
        "rows": options.rows,
        "width": options.width,
        "dtype": options.dtype,
        "batch": options.batch,
        "points": points,
        "threads": torch.get_num_threads(),
        "stores": {},
    }
    for name, uri in stores.items():
        entry = result["stores"][name] = _time_store(uri, options, verbose)
        if verbose:
            print(
                f"{name} ({uri}): {len(points)} SAEs {points}, {options.rows} rows x "
                f"{options.width} {options.dtype}\n"
                f"  one by one {entry['one_by_one_s']} s (CPU {entry['one_by_one_cpu_s']} s)   "
                f"group {entry['group_s']} s (CPU {entry['group_cpu_s']} s)\n"
                f"  saving (medians): wall {100 * entry['saving']:.1f}%, CPU "
                f"{100 * entry['cpu_saving']:.1f}%   identical weights: "
                f"{entry['identical_weights']}   load average {entry['load_average']}"
            )
    return result
