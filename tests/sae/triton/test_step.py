"""The sparse step on the Triton path equals the dense reference: the loss, the reconstruction
and every parameter's and the input's gradient, for TopK (plain, multi-TopK, BatchTopK, with
AuxK) and the expander (its compact decoder, untied and tied encoders); and which path runs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install '.[triton]')")

from sae_core.bench.options import TrainBench  # noqa: E402
from sae_core.bench.train_step import bench_train  # noqa: E402
from sae_core.config import SAEConfig  # noqa: E402
from sae_core.sae import ExpanderSAE, TopKSAE, kernels  # noqa: E402


@pytest.fixture
def on_triton(monkeypatch, device):
    """The sparse ops on the Triton kernels wherever they run (here: CPU, interpreted); the
    native fused CPU loss, which would take over first, off."""
    monkeypatch.setattr(kernels, "TRITON", "always")
    monkeypatch.setattr(kernels, "USE_NATIVE", False)
    return device


def _step_against_dense(sae, x: torch.Tensor, dead: torch.Tensor) -> None:
    """One forward and backward on the sparse path and on the dense reference, compared."""
    runs = {}
    for dense in (False, True):
        sae.zero_grad()
        inp = x.clone().requires_grad_()
        out = sae(inp, dead, dense=dense)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in sae.named_parameters()} | {"x": inp.grad}
        runs[dense] = (out, grads)
    (out, grads), (ref, ref_grads) = runs[False], runs[True]
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.recon, ref.recon, rtol=1e-5, atol=1e-5)
    for name, g in ref_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("variant", ["topk", "multi_topk", "batch_topk"])
def test_topk_step_equals_dense_reference(on_triton, variant):
    torch.manual_seed(0)
    d, n = 37, 48  # a partial column block; k_aux 17: a partial slot block
    flags = {"multi_topk": variant == "multi_topk", "batch_topk": variant == "batch_topk"}
    sae = TopKSAE(d, SAEConfig(n_latents=n, k=5, k_aux=17, **flags)).to(on_triton)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(0, 0.2)
        sae.W_enc.add_(0.1 * torch.randn_like(sae.W_enc))  # untie, so a swapped weight would show
    x = (torch.randn(12, d) + 0.5).to(on_triton)
    _step_against_dense(sae, x, (torch.rand(n) < 0.4).to(on_triton))


@pytest.mark.parametrize("encoder", ["untied", "tied"])
def test_expander_step_equals_dense_reference(on_triton, encoder):
    torch.manual_seed(1)
    d, n = 37, 48
    cfg = SAEConfig(kind="expander", n_latents=n, k=5, k_aux=17, degree=3, encoder=encoder)
    sae = ExpanderSAE(d, cfg).to(on_triton)
    with torch.no_grad():
        sae.b_pre.normal_()
        sae.b_enc.normal_(0, 0.2)
    x = (torch.randn(12, d) + 0.5).to(on_triton)
    _step_against_dense(sae, x, (torch.rand(n) < 0.4).to(on_triton))


def test_the_triton_path_runs_on_cuda_tensors_only_by_default(monkeypatch):
    """TRITON = "auto": CPU tensors keep the native or stock path; the ops module is what a CUDA
    tensor would get (the same function `triton_for` returns)."""
    cpu = torch.zeros(2)
    assert kernels.TRITON == "auto" and kernels.triton_for(cpu) is None
    monkeypatch.setattr(kernels, "USE_NATIVE", False)
    assert kernels.sparse_path(torch.device("cpu")) == "torch"
    monkeypatch.setattr(kernels, "TRITON", "always")
    assert kernels.sparse_path(torch.device("cpu")) == "triton"
    monkeypatch.setattr(kernels, "TRITON", "never")
    assert kernels.triton_for(cpu) is None


def test_the_training_benchmark_steps_on_the_path_it_reports(on_triton, monkeypatch):
    """`saeflow bench train` reports the sparse kernels its step took, and took them: here the
    Triton kernels (on CUDA, TRITON = "auto" picks them; see above)."""
    from sae_core.sae.triton import ops

    launched = []
    for name in ("gather_sum", "gather_dots", "latent_sums"):
        kernel = getattr(ops, name)
        monkeypatch.setattr(
            ops, name, lambda *a, k=kernel, n=name, **kw: (launched.append(n), k(*a, **kw))[1]
        )
    tiny = TrainBench(d=16, n=64, k=4, batch=16, steps=1, device=str(on_triton))
    r = bench_train(tiny, warmup=0, verbose=False)
    assert r["sparse_kernels"] == "triton" and r["step_ms"] > 0
    assert set(launched) == {"gather_sum", "gather_dots", "latent_sums"}


def test_the_kernels_are_part_of_the_training_code_fingerprint(tmp_path, monkeypatch):
    """A CUDA run trains with these kernels: editing one changes what training's outputs are
    stored under (read from the package's SOURCES, so no triton import is needed)."""
    import shutil
    from pathlib import Path

    from sae_core.sae import triton as triton_kernels
    from sae_core.stages import train
    from sae_core.storage.fingerprint import code_fingerprint

    assert triton_kernels in train.CODE
    on_disk = {p.name for p in Path(triton_kernels.__file__).parent.glob("*.py")} - {"__init__.py"}
    assert {p.name for p in triton_kernels.SOURCES} == on_disk
    fingerprint = code_fingerprint.__wrapped__  # uncached
    copies = tuple(Path(shutil.copy(p, tmp_path / p.name)) for p in triton_kernels.SOURCES)
    real = fingerprint(*train.CODE)
    monkeypatch.setattr(triton_kernels, "SOURCES", copies)
    assert fingerprint(*train.CODE) == real
    (tmp_path / "gather.py").write_text((tmp_path / "gather.py").read_text() + "# edited\n")
    assert fingerprint(*train.CODE) != real
