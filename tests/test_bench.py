"""The training benchmark runs and reports every field the CLI prints (a smoke test, tiny shape)."""

from __future__ import annotations

from sae_core.bench import PHASES, bench_train


def test_bench_train_reports_ratio_breakdown_and_memory():
    r = bench_train(d=16, n=64, k=4, batch=32, steps=2, warmup=1, device="cpu", verbose=False)
    assert r["ratio"] > 0 and r["tokens_per_s"] > 0 and r["step_ms"] > 0
    assert set(r["breakdown_ms"]) == set(PHASES)
    assert sum(r["breakdown_ms"].values()) <= r["step_ms"] * 1.5
    assert r["bxn_buffer_mb"] == round(32 * 64 * 4 / 2**20, 1) and r["peak_rss_mb"] > 0
