"""The extraction benchmark: tokens/s beside the forward's FLOP limit, in either model dtype."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sae_core.bench.extract import bench_extract, forward_flops
from sae_core.bench.options import ExtractBench


def test_forward_flops_of_smollm2_cut_after_layer_15():
    # SmolLM2-135M: d 576, 9 heads of 64 (3 for keys and values), MLP 1536; 16 blocks run.
    config = SimpleNamespace(
        hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536
    )
    # ~113 MFLOP per token (16 layers of ~3.5M weights, x2), plus attention over 32 positions.
    assert forward_flops(config, 16, 64) / 1e6 == pytest.approx(114.4, abs=0.1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_extract_reports_its_flop_limit(tiny_llama_dir, dtype):
    options = ExtractBench(
        model=str(tiny_llama_dir),
        hook=["resid_post.1"],
        tokens=256,
        context_len=16,
        batch_tokens=128,
        shard_mb=0.01,
        repeats=1,
        dtype=dtype,
        device="cpu",
    )
    result = bench_extract(options, verbose=False)
    assert result["dtype"] == dtype
    limit = result["flop_limit_tokens_per_s"]
    gflops = result["gemm_flops_per_s"]
    assert limit == pytest.approx(gflops / result["forward_flops_per_token"], rel=0.01)
    assert result["ratio_vs_flop_limit"] == pytest.approx(
        result["extract_tokens_per_s"] / limit, rel=0.01, abs=1e-3
    )
