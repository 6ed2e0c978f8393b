"""Training-step benchmark: tokens/s, memory, a time breakdown, and the step's cost in GEMMs.

ratio = time(one dense x[B, d] @ W[d, n]) / time(one training step), both measured in the same
run, interleaved (median of the per-step ratios; `ratio_best` = best GEMM / best step). A
sparse-aware step is about one such GEMM plus O(B k d) work; a dense implementation costs ~6. The target on a 2-core CPU at d=576, k=32, B=4096 is ratio >= 0.7.
kind="expander" times an Expander SAE's step (decoder with `degree` non-zeros per latent).
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from typing import Any

import torch
from pydantic import ValidationError

from sae_core.bench.options import TrainBench
from sae_core.config import SAEConfig, TrainConfig, format_validation_error
from sae_core.device import pick_device
from sae_core.errors import ConfigError
from sae_core.sae import kernels, native
from sae_core.training.trainer import Trainer, init_sae

PHASES = ("normalize", "gemm", "topk", "decode", "backward", "optimizer")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_train(
    options: TrainBench,
    *,
    warmup: int = 2,
    data: torch.Tensor | None = None,
    threads: int | None = None,
    multi_topk: bool = False,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Time `options.steps` training steps (after `warmup`) on `data` [N, d] (default:
    Gaussian).

    Returns medians in milliseconds, tokens/s, the GEMM ratio, peak memory and the breakdown
    (median ms per phase: normalize, gemm, topk, decode, backward, optimizer). Prints a table
    unless verbose=False. dtype: the step's GEMM precision (train.dtype); the reference GEMM
    stays float32, so the ratio says what bfloat16 buys against the float32 product.
    kind, degree, encoder: the SAE (sae.kind, sae.degree, sae.encoder); invalid ones raise
    ConfigError naming the field.
    """
    d, n, k, batch, kind = options.d, options.n, options.k, options.batch, options.kind
    dev = pick_device(options.device)
    rss_before = _peak_rss_mb()
    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    if data is None:
        data = torch.randn(2 * batch, d, generator=g)
    if data.shape[0] < batch:
        raise ValueError(f"bench: data has {data.shape[0]} rows, fewer than batch={batch}")
    # b_pre from the mean: the geometric median's float64 temporaries would dominate peak memory
    # and say nothing about the step.
    try:
        sae_cfg = SAEConfig(
            kind=kind,
            n_latents=n,
            k=k,
            multi_topk=multi_topk,
            b_pre_init="mean",
            degree=options.degree,
            encoder=options.encoder,
        )
        train_cfg = TrainConfig(batch_size=batch, dtype=options.dtype)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    trainer = Trainer(init_sae(d, sae_cfg, data[: min(len(data), 8192)], seed), train_cfg, dev)
    W = torch.randn(d, n, generator=g).to(dev)
    ref_out = torch.empty(batch, n, device=dev)
    batches = [data[i : i + batch].to(dev) for i in range(0, len(data) - batch + 1, batch)]

    step_ms: list[float] = []
    gemm_ms: list[float] = []
    phase_ms: dict[str, list[float]] = {p: [] for p in PHASES}
    marks: list[tuple[str, float]] = []

    def mark(phase: str) -> None:
        _sync(dev)
        marks.append((phase, time.perf_counter()))

    for i in range(warmup + options.steps):
        x = batches[i % len(batches)]
        _sync(dev)
        t0 = time.perf_counter()
        torch.mm(x, W, out=ref_out)
        _sync(dev)
        t1 = time.perf_counter()
        marks.clear()
        trainer.step(x, mark)
        if i < warmup:
            continue
        gemm_ms.append((t1 - t0) * 1e3)
        step_ms.append((marks[-1][1] - t1) * 1e3)
        prev = t1
        for phase, t in marks:
            phase_ms[phase].append((t - prev) * 1e3)
            prev = t

    step = statistics.median(step_ms)
    gemm = statistics.median(gemm_ms)
    # Each step is paired with the GEMM timed just before it, so load from other processes
    # hits both sides of a pair alike; the median pair ratio is the headline figure.
    ratio = statistics.median(g / s for g, s in zip(gemm_ms, step_ms, strict=True))
    result: dict[str, Any] = {
        "kind": kind,
        "degree": options.degree if kind == "expander" else None,
        "encoder": options.encoder if kind == "expander" else None,
        "d": d,
        "n": n,
        "k": k,
        "batch": batch,
        "steps": options.steps,
        "device": str(dev),
        "dtype": options.dtype,
        "threads": torch.get_num_threads(),
        "native_kernels": dev.type == "cpu" and native.load() is not None,
        # The sparse ops' kernels: "triton" on CUDA with triton installed, "native" on CPU.
        "sparse_kernels": kernels.sparse_path(dev),
        "step_ms": round(step, 2),
        "gemm_ms": round(gemm, 2),
        "ratio": round(ratio, 3),
        "ratio_best": round(min(gemm_ms) / min(step_ms), 3),
        "tokens_per_s": round(batch / step * 1e3, 1),
        "breakdown_ms": {p: round(statistics.median(v), 2) for p, v in phase_ms.items()},
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        # Growth of the process's peak resident memory during the benchmark: the data, the
        # model with gradients and Adam state, the step's B x n buffer, the reference GEMM's
        # own B x n output, and the step's temporaries (the rest).
        "peak_rss_growth_mb": round(_peak_rss_mb() - rss_before, 1),
        "model_state_mb": round(
            sum(p.numel() for p in trainer.sae.parameters()) * 4 * 4 / 2**20, 1
        ),
        "data_mb": round(data.numel() * data.element_size() / 2**20, 1),
        "bxn_buffer_mb": round(
            kernels.padded_bytes(batch, n, getattr(torch, options.dtype)) / 2**20, 1
        ),
        "cpu_count": os.cpu_count(),
    }
    if dev.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    if verbose:
        print(format_result(result))
    return result


def format_result(r: dict[str, Any]) -> str:
    sae = f"expander degree={r['degree']} {r['encoder']}" if r["kind"] == "expander" else r["kind"]
    head = (
        f"{sae} d={r['d']} n={r['n']} k={r['k']} B={r['batch']} {r['dtype']} on {r['device']} ({r['threads']} threads, "
        f"sparse kernels: {r['sparse_kernels']})"
    )
    lines = [
        head,
        f"  step {r['step_ms']:.1f} ms   dense GEMM {r['gemm_ms']:.1f} ms   "
        f"ratio {r['ratio']:.2f} (best-of {r['ratio_best']:.2f})   "
        f"{r['tokens_per_s']:.0f} tokens/s",
        "  breakdown: "
        + "  ".join(f"{p} {ms:.1f}" for p, ms in r["breakdown_ms"].items())
        + "  (ms)",
        f"  peak RSS {r['peak_rss_mb']:.0f} MiB, +{r['peak_rss_growth_mb']:.0f} MiB during the run "
        f"(model+grad+Adam {r['model_state_mb']:.0f}, data {r['data_mb']:.0f}, "
        f"B x n buffer {r['bxn_buffer_mb']:.0f} + the reference GEMM's output "
        f"{r['batch'] * r['n'] * 4 / 2**20:.0f} MiB)",
    ]
    return "\n".join(lines)
