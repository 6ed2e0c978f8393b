"""The training benchmark runs and reports every field the CLI prints (a smoke test, tiny shape)."""

from __future__ import annotations

import pytest

from sae_core.bench.options import GroupBench, TrainBench
from sae_core.bench.train_step import PHASES, bench_train, format_result
from sae_core.errors import ConfigError
from sae_core.sae import kernels

TINY = {"d": 16, "n": 64, "k": 4, "batch": 32, "device": "cpu"}


def test_bench_train_reports_ratio_breakdown_and_memory():
    r = bench_train(TrainBench(**TINY, steps=2), warmup=1, verbose=False)
    assert r["ratio"] > 0 and r["tokens_per_s"] > 0 and r["step_ms"] > 0
    assert set(r["breakdown_ms"]) == set(PHASES)
    assert sum(r["breakdown_ms"].values()) <= r["step_ms"] * 1.5
    assert r["peak_rss_mb"] > 0
    assert r["bxn_buffer_mb"] == round(32 * (64 + kernels.PRE_ROW_PAD) * 4 / 2**20, 1)
    assert r["sparse_kernels"] == ("native" if r["native_kernels"] else "torch")


def test_bench_train_times_an_expander_step_with_the_same_fields():
    dense = bench_train(TrainBench(**TINY, steps=1), warmup=1, verbose=False)
    expander = TrainBench(**TINY, steps=1, kind="expander", degree=4, encoder="tied")
    r = bench_train(expander, warmup=1, verbose=False)
    assert set(r) == set(dense) and r["step_ms"] > 0
    assert (r["kind"], r["degree"], r["encoder"]) == ("expander", 4, "tied")


def test_bench_train_times_a_matryoshka_step():
    r = bench_train(TrainBench(**TINY, steps=1, kind="matryoshka"), warmup=1, verbose=False)
    assert r["kind"] == "matryoshka" and r["step_ms"] > 0
    assert format_result(r).startswith("matryoshka d=16 n=64")


def test_bench_train_names_a_bad_sae_field():
    with pytest.raises(ConfigError, match="sae.degree"):
        bench_train(TrainBench(**TINY, steps=1, degree=4), verbose=False)
    with pytest.raises(ConfigError, match="dtype.*'float32' or 'bfloat16'"):
        bench_train(TrainBench(**TINY, steps=1, dtype="fp16"), verbose=False)


def test_bench_group_times_both_ways_on_the_same_sae_results(tmp_path):
    from sae_core.bench.group import bench_group

    options = GroupBench(
        n=[32, 64, 96], k=4, rows=2048, width=16, batch=256, shard_mb=0.05, repeats=2
    )
    r = bench_group(options, {"local": str(tmp_path / "store")}, verbose=False)
    entry = r["stores"]["local"]
    assert len(entry["one_by_one_s"]) == len(entry["group_cpu_s"]) == 2
    assert min(entry["one_by_one_s"] + entry["group_s"]) > 0 and entry["saving"] < 1
    assert entry["identical_weights"] is True and len(entry["load_average"]) == 5
    assert not (tmp_path / "store" / "bench-group").exists()


def test_bench_hash_times_the_first_and_the_remembered_fingerprint(tmp_path):
    from sae_core.bench.hashing import bench_hash
    from sae_core.bench.options import HashBench
    from sae_core.storage import digests

    (tmp_path / "model.safetensors").write_bytes(b"w" * (digests.REMEMBERED_FROM + 1))
    (tmp_path / "config.json").write_text("{}")
    r = bench_hash(HashBench(model=str(tmp_path), repeats=2), verbose=False)
    assert r["first_s"] > 0 and r["rerun_median_s"] <= r["rerun_max_s"]
    assert r["mb"] == round((digests.REMEMBERED_FROM + 3) / 1e6, 1)
    with pytest.raises(ConfigError, match="--model"):
        bench_hash(HashBench(model=str(tmp_path / "config.json")), verbose=False)
