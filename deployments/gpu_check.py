"""One GPU's figures for the TopK SAE step on saeflow's Triton kernels, printed as JSON.

Standalone on purpose: a GPU node may lack saeflow's orchestration stack and the network. It
needs torch with CUDA and triton; transformers (pure Python) for the extraction figures;
`eai-sparsify` is optional (its step is timed on the same shapes and data where it imports).
It loads the kernels from `sae_core/sae/triton/` by path, without importing saeflow.

The step timed is the one saeflow's trainer runs on CUDA, written out here without the trainer:
x - b_pre, the encoder GEMM in bfloat16, torch's top-k (k latents per token), the selected
pre-activations and the decoder on the Triton kernels under autograd (float32 master weights,
float32 accumulation), the normalised MSE, backward, the decoder gradient's radial part removed,
fused Adam, the decoder rows renormalised. AuxK and multi-TopK are left out. Per shape it prints
the step's median time against one bf16 encoder GEMM of the same batch (ratio = GEMM / step),
tokens/s and peak memory; then extraction tokens/s through SmolLM2-135M's architecture (random
weights, from its config) truncated after the hook's layer, against the bare truncated forward.

`--dry-run` runs every part on CPU at tiny shapes under TRITON_INTERPRET=1 (a test runs it):
the figures then mean nothing, the code paths are the GPU's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

KERNELS = Path(__file__).resolve().parent.parent / "sae_core" / "sae" / "triton"
SHAPES = [(d, n) for d in (576, 2048) for n in (16_384, 65_536, 262_144)]
DRY_SHAPES = [(16, 64)]
# SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json): the shapes that set its throughput.
SMOLLM2 = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
DRY_LLAMA = SMOLLM2 | {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": 256,
}


def load_kernels() -> ModuleType:
    """saeflow's Triton ops (`sae_core/sae/triton/ops.py`), loaded by path as a package of its
    own: importing sae_core would pull in its dependencies."""
    spec = importlib.util.spec_from_file_location(
        "saeflow_triton", KERNELS / "__init__.py", submodule_search_locations=[str(KERNELS)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["saeflow_triton"] = package
    spec.loader.exec_module(package)
    return importlib.import_module("saeflow_triton.ops")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: Any) -> float:
    """Seconds of fn(), the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


class TopKStep:
    """A TopK SAE of width d with n latents, k per token, and its training step (module doc)."""

    def __init__(self, d: int, n: int, k: int, device: Any, ops: ModuleType):
        import torch

        g = torch.Generator().manual_seed(0)
        W = torch.randn(n, d, generator=g)
        W /= W.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(W.clone().to(device))
        self.W_enc = torch.nn.Parameter(W.to(device))  # tied at initialisation only
        self.b_enc = torch.nn.Parameter(torch.zeros(n, device=device))
        self.b_pre = torch.nn.Parameter(torch.zeros(d, device=device))
        params = [self.W_dec, self.W_enc, self.b_enc, self.b_pre]
        self.opt = torch.optim.Adam(params, lr=1e-4, fused=device.type == "cuda")
        self.k, self.ops = k, ops

    def __call__(self, x: Any) -> None:
        import torch

        ops = self.ops
        with torch.no_grad():
            xc = (x - self.b_pre).to(torch.bfloat16)
            pre = torch.addmm(self.b_enc.to(torch.bfloat16), xc, self.W_enc.to(torch.bfloat16).t())
            vals, idx = pre.topk(self.k, dim=1, sorted=False)
            spread = (x - x.mean(dim=0)).pow(2).sum()
        sel = ops.selected_preacts(x, self.b_pre, self.W_enc, self.b_enc, vals.float(), idx)
        recon = ops.sparse_decode(idx, torch.relu(sel), self.W_dec, self.b_pre)
        loss = (recon - x).pow(2).sum() / spread
        loss.backward()
        with torch.no_grad():
            W, G = self.W_dec, self.W_dec.grad
            G -= (G * W).sum(dim=1, keepdim=True) * W
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            W /= W.norm(dim=1, keepdim=True)


def sparsify_step(d: int, n: int, k: int, device: Any) -> Any:
    """sparsify's SparseCoder step on the same shapes (FVU loss, bf16 autocast as its trainer
    runs it, the same fused Adam). ImportError where eai-sparsify does not import."""
    import torch
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(x: Any) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = sae(x)
        out.fvu.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_step(step: Any, d: int, n: int, batch: int, steps: int, device: Any) -> dict[str, Any]:
    """Median step time against one bf16 encoder GEMM of the batch, paired step by step."""
    import torch

    g = torch.Generator().manual_seed(1)
    data = [torch.randn(batch, d, generator=g).to(device) for _ in range(2)]
    W = torch.randn(d, n, generator=g).to(device, torch.bfloat16)
    gemm_out = torch.empty(batch, n, device=device, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step(data[0])  # warm-up: compiles the kernels, allocates
    gemm_s, step_s = [], []
    for i in range(steps):
        x = data[i % 2]
        gemm_s.append(_timed(lambda x=x: torch.mm(x.to(torch.bfloat16), W, out=gemm_out), device))
        step_s.append(_timed(lambda x=x: step(x), device))
    median = statistics.median(step_s)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "step_ms": round(median * 1e3, 3),
        "gemm_ms": round(statistics.median(gemm_s) * 1e3, 3),
        "ratio_gemm_over_step": round(
            statistics.median(gs / ss for gs, ss in zip(gemm_s, step_s, strict=True)), 3
        ),
        "tokens_per_s": round(batch / median, 1),
        "peak_mb": None if peak is None else round(peak, 1),
    }


def _guarded(device: Any, measure: Any, *args: Any) -> dict[str, Any]:
    """measure(*args)'s figures, or {"error": its first line} (e.g. out of memory at the largest
    shape), so one failure leaves the other shapes' figures; device memory freed after."""
    import torch

    try:
        return measure(*args)
    except (RuntimeError, ImportError) as err:  # torch.OutOfMemoryError is a RuntimeError
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def extraction(config: dict, layer: int, tokens: int, context: int, device: Any) -> dict:
    """tokens/s of the forward truncated after `layer` with its output copied to host memory
    (what extraction does per batch), against the bare truncated forward and the full one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**config)).to(dtype).eval()
    rows = max(1, tokens // context)
    ids = torch.randint(0, config["vocab_size"], (rows, context), device=device)
    layers = model.model.layers
    kept = layers[: layer + 1]
    captured: list[Any] = []
    host = torch.empty(rows * context, config["hidden_size"], dtype=dtype)
    host = host.pin_memory() if device.type == "cuda" else host

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    def truncated(copy: bool) -> None:
        model.model.layers = kept
        try:
            with torch.inference_mode():
                model.model(input_ids=ids, use_cache=False)
                if copy:
                    host.copy_(captured.pop().reshape(-1, host.shape[1]), non_blocking=True)
        finally:
            model.model.layers = layers

    def full() -> None:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)

    handle = kept[-1].register_forward_hook(hook)
    try:
        truncated(True)  # warm-up
        times: dict[str, list[float]] = {"bare": [], "extract": [], "full": []}
        for _ in range(3):
            times["bare"].append(_timed(lambda: truncated(False), device))
            captured.clear()
            times["extract"].append(_timed(lambda: truncated(True), device))
            times["full"].append(_timed(full, device))
            captured.clear()
    finally:
        handle.remove()
    n_tokens = rows * context

    def tps(key: str) -> float:
        return round(n_tokens / statistics.median(times[key]), 1)

    return {
        "layers_run": layer + 1,
        "layers_total": config["num_hidden_layers"],
        "tokens": n_tokens,
        "dtype": str(dtype).removeprefix("torch."),
        "extract_tokens_per_s": tps("extract"),
        "bare_truncated_tokens_per_s": tps("bare"),
        "full_depth_tokens_per_s": tps("full"),
        "ratio_extract_over_bare": round(tps("extract") / tps("bare"), 3),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted")
    parser.add_argument("--batch", type=int, default=4096, help="tokens per training step")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per shape")
    parser.add_argument("--layer", type=int, default=15, help="the hook's layer (resid_post)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined
    import torch
    import triton

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; --dry-run checks the code paths on CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    ops = load_kernels()
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    batch, k = (32, 4) if args.dry_run else (args.batch, args.k)
    steps = 1 if args.dry_run else args.steps
    report: dict[str, Any] = {
        "device": "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(device),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "batch": batch,
        "k": k,
        "shapes": [],
    }
    have_sparsify = importlib.util.find_spec("sparsify") is not None
    report["sparsify"] = "installed" if have_sparsify else "absent: eai-sparsify does not import"

    def measured(make: Any, d: int, n: int) -> dict[str, Any]:
        return time_step(make(d, n, k, device), d, n, batch, steps, device)

    def ours(d: int, n: int, k: int, device: Any) -> TopKStep:
        return TopKStep(d, n, k, device, ops)

    for d, n in shapes:
        row: dict[str, Any] = {"d": d, "n": n}
        row |= _guarded(device, measured, ours, d, n)
        if have_sparsify:
            theirs = _guarded(device, measured, sparsify_step, d, n)
            row["sparsify"] = theirs
            if "tokens_per_s" in row and "tokens_per_s" in theirs:
                row["tokens_per_s_over_sparsify"] = round(
                    row["tokens_per_s"] / theirs["tokens_per_s"], 3
                )
        report["shapes"].append(row)
    try:
        config = DRY_LLAMA if args.dry_run else SMOLLM2
        layer = 1 if args.dry_run else args.layer  # dry: 2 of the tiny model's 3 layers
        tokens, context = (64, 16) if args.dry_run else (65_536, 1024)
        report["extraction"] = extraction(config, layer, tokens, context, device)
    except ImportError as err:
        report["extraction"] = f"skipped: {err}"
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
