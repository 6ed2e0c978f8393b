"""The native kernels refuse a wrong argument with a message naming it (checked at the binding,
before any pointer is read), and their C++ sources are part of the code fingerprint."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from sae_core.sae import native
from sae_core.storage.fingerprint import code_fingerprint

# A small valid call of each kernel's arguments: B = 4 tokens, K = 3 slots, n = 30 latents, d = 8.
B, K, N, D = 4, 3, 30, 8


def _args() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "idx": torch.randint(0, N, (B, K), generator=g),
        "vals": torch.rand(B, K, generator=g),
        "W": torch.randn(N, D, generator=g),
        "xc": torch.randn(B, D, generator=g),
        "bias": torch.randn(D, generator=g),
        "rows": torch.empty(1, 2, B, 16),  # [P, S, B, 16]: one panel, xc and r_main
    }


def _decode(ext, a, **changed):
    """decode_forward on the valid arguments, with `changed` in place of some of them."""
    kw = {"xc": a["xc"], "b_pre": a["bias"], "W": a["W"], "idx": a["idx"], "acts": a["vals"]}
    kw |= {"k": K, "k_main": K, "rows": a["rows"]} | changed
    return ext.decode_forward(
        kw["xc"], kw["b_pre"], kw["W"], kw["idx"], kw["acts"], kw["k"], kw["k_main"], True, 0,
        kw["rows"], torch.empty(0),
    )  # fmt: skip


def _weight_grads(ext, a, **changed):
    """weight_grads on the valid arguments (k = k_main = K, no dpre), with `changed` in place."""
    kw = {"k": K, "rows": a["rows"], "head": torch.empty(0)} | changed
    v = a["vals"]
    return ext.weight_grads(
        a["idx"], N, kw["k"], K, kw["rows"], v, v, v, kw["head"], 1.0, 1.0, 0.0, D, False
    )


def _adam(ext, a, **changed):
    """adam_unit_rows on the valid arguments (zero moments, no panels), `changed` in place."""
    kw = {"m": torch.zeros(N, D), "v": torch.zeros(N, D), "panels_out": torch.empty(0)} | changed
    W = a["W"].clone()
    ext.adam_unit_rows(W, a["W"], kw["m"], kw["v"], kw["panels_out"], 1e-3, 0.9, 0.999, 1e-8, 1.0)


# (what the message must say, a call that breaks one precondition)
CASES = {
    "wrong dtype": (
        "gather_sum: W must be a contiguous float32 CPU tensor of shape [n, d]; got float64 CPU "
        "tensor of shape [30, 8]",
        lambda ext, a: ext.gather_sum(a["idx"], a["vals"], a["W"].double(), a["bias"]),
    ),
    "float indices": (
        "fire_counts: idx must be a contiguous int64 CPU tensor of shape [B, K]; got int32",
        lambda ext, a: ext.fire_counts(a["idx"].int(), a["vals"], N, 0.5),
    ),
    "non-contiguous": (
        "project_rows: G must be a contiguous float32 CPU tensor of shape [n, d] = [30, 8]; got "
        "float32 CPU tensor of shape [30, 8], non-contiguous",
        lambda ext, a: ext.project_rows(a["W"], torch.randn(D, N).t()),
    ),
    "non-contiguous rows": (
        "topk_rows: pre must be a float32 CPU tensor of shape [B, n] with contiguous rows; got "
        "float32 CPU tensor of shape [8, 30], non-contiguous, strides [1, 8]",
        lambda ext, a: ext.topk_rows(a["W"].t(), 3, torch.empty(0)),
    ),
    "k past the row": (
        "topk_rows: k must be in [1, n] = [1, 30]; got 31",
        lambda ext, a: ext.topk_rows(a["vals"].new_zeros(B, N), 31, torch.empty(0)),
    ),
    "bias of another width": (
        "topk_rows: bias must be empty or a contiguous float32 CPU tensor of shape [n] = [30]; "
        "got float32 CPU tensor of shape [8]",
        lambda ext, a: ext.topk_rows(a["vals"].new_zeros(B, N), 3, a["bias"]),
    ),
    "acts of another shape": (
        "decode_forward: acts must be a contiguous float32 CPU tensor of shape [B, K] = [4, 3]; "
        "got float32 CPU tensor of shape [4, 2]",
        lambda ext, a: _decode(ext, a, acts=a["vals"][:, :2].contiguous()),
    ),
    "W of another width": (
        "decode_forward: W must be a contiguous float32 CPU tensor of shape [n, d] = [*, 8]; got "
        "float32 CPU tensor of shape [30, 9]",
        lambda ext, a: _decode(ext, a, W=torch.randn(N, D + 1)),
    ),
    "rows for another batch": (
        "decode_forward: rows must be a contiguous float32 CPU tensor of shape [P, S, B, 16] = "
        "[1, 2, 4, 16]; got float32 CPU tensor of shape [1, 2, 5, 16]",
        lambda ext, a: _decode(ext, a, rows=torch.empty(1, 2, B + 1, 16)),
    ),
    "k above k_main": (
        "decode_forward: need 1 <= k <= k_main <= K = 3; got k = 3, k_main = 2",
        lambda ext, a: _decode(ext, a, k_main=2),
    ),
    "head missing": (
        "weight_grads: head must be a contiguous float32 CPU tensor of shape [B, k] = [4, 1]; got "
        "float32 CPU tensor of shape [0]",
        lambda ext, a: _weight_grads(ext, a, k=1, rows=torch.empty(1, 3, B, 16)),
    ),
    "moments of another shape": (
        "adam_unit_rows: v must be a contiguous float32 CPU tensor of shape [n, d] = [30, 8]; got "
        "float32 CPU tensor of shape [30, 7]",
        lambda ext, a: _adam(ext, a, v=torch.zeros(N, D - 1)),
    ),
    "panels for another n": (
        "adam_unit_rows: panels_out must be empty or a contiguous float32 CPU tensor of shape "
        "[P, n, 16] = [1, 30, 16]; got float32 CPU tensor of shape [1, 29, 16]",
        lambda ext, a: _adam(ext, a, panels_out=torch.empty(1, N - 1, 16)),
    ),
    "offset of another width": (
        "normalize_tokens: offset must be empty or a contiguous float32 CPU tensor of shape [d] = "
        "[8]; got float32 CPU tensor of shape [7]",
        lambda ext, a: ext.normalize_tokens(a["xc"], 1e-8, torch.zeros(D - 1)),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_broken_precondition_names_the_argument(case):
    ext = native.load()
    if ext is None:
        pytest.skip("native kernels unavailable (no compiler)")
    message, call = CASES[case]
    args = _args()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        call(ext, args)


def test_the_valid_arguments_pass():
    """The calls above break one precondition each of arguments that are otherwise valid."""
    ext = native.load()
    if ext is None:
        pytest.skip("native kernels unavailable (no compiler)")
    a = _args()
    assert _decode(ext, a)[0].shape == (B, D)
    assert ext.gather_sum(a["idx"], a["vals"], a["W"], a["bias"]).shape == (B, D)
    assert ext.topk_rows(a["vals"].new_zeros(B, N), 3, torch.empty(0))[1].shape == (B, 3)
    assert _weight_grads(ext, a)[0].shape == (N, D)
    _adam(ext, a, panels_out=torch.empty(1, N, 16))


def test_sources_list_every_csrc_file():
    on_disk = sorted(p for p in native.CSRC.iterdir() if p.suffix in (".cpp", ".h"))
    assert list(native.SOURCES) == on_disk
    assert {"bindings.cpp", "common.h", "topk.cpp", "decode.cpp"} <= {p.name for p in on_disk}


def test_code_fingerprint_follows_the_csrc_bytes(tmp_path, monkeypatch):
    fingerprint = code_fingerprint.__wrapped__  # uncached: SOURCES changes under one module
    copies = tuple(Path(shutil.copy(src, tmp_path / src.name)) for src in native.SOURCES)
    real = fingerprint(native)
    monkeypatch.setattr(native, "SOURCES", copies)
    assert fingerprint(native) == real  # the same bytes, elsewhere
    edited = tmp_path / "decode.cpp"
    edited.write_bytes(edited.read_bytes() + b"// one more comment\n")
    assert fingerprint(native) != real


def test_a_dead_builders_lock_does_not_stall_the_next_build(tmp_path, monkeypatch):
    """torch's build lock, left by a builder killed mid-build, is cleared under the builder flock
    (the next process used to wait on it forever)."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("SAEFLOW_NATIVE_KERNELS", raising=False)
    built = []

    def fake_build(name: str, build_directory: str, **_kwargs):
        assert not (Path(build_directory) / "lock").exists()  # torch would wait on it
        built.append(name)
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    name_prefix = "saeflow_sparse_kernels_"
    native.load.cache_clear()
    try:
        assert native.load() == "module"
        (tmp_path / built[0] / "lock").touch()  # a builder killed while holding it
        native.load.cache_clear()
        assert native.load() == "module"
    finally:
        native.load.cache_clear()
    assert len(built) == 2 and built[0].startswith(name_prefix)
