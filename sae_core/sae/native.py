"""Native CPU kernels for the sparse step, compiled on first use (torch cpp_extension + OpenMP).

Each kernel is O(work actually needed): a row-wise top-k that filters each row against a
threshold (the previous row's, or one from its block maxima), and the B K d gathers and
scatters of the sparse decoder and encoder backward, fused into one token-major pass
(`decode_forward`) and one latent-major pass (`weight_grads`), and the unit-norm decoder's
optimiser step as one pass over its rows (`adam_unit_rows`). Past the GEMM the step is bound
by where its gathered rows come from, not by arithmetic: whole rows of a 10 MB matrix come
from L3 at ~6 GB/s per core here, single lines of a 0.6 MB one from L2 at ~35 GB/s. So both
passes walk the columns in panels of 16 (one cache line per row) with every token or latent
inside, and a panel of the gathered matrix stays in L2; a decoder whose panels do not fit
falls back to gathering whole rows. All kernels are deterministic: every output element is
written by one thread in a fixed order, independent of the thread count.

The C++ lives in `csrc/`, a file per kernel family, each kernel's shapes and cost at its
definition: `topk.cpp`, `gather_sum.cpp` (the inference decoder), `decode.cpp` and
`decode_rows.cpp` (+ `.h`: the training decoder's two layouts), `weight_grads.cpp`,
`optimizer.cpp` (the unit-norm decoder rows and their Adam step), `normalize.cpp`,
`counts.cpp`; the headers `common.h` (vector helpers, grain, prefetches), `panels.h` (the panel
layout), `checks.h` (the argument checks every entry point makes), `alloc.h` (output tensors)
and `kernels.h` (the entry points); and `bindings.cpp`, the Python module. The files compile in
parallel, and none includes <torch/extension.h>: bindings.cpp takes torch's pybind11 glue alone
(9 s of CPU here against 26 s), the kernel files only the ATen headers they use (~3 s each).

`load()` returns the compiled module, or None when no compiler is available or
SAEFLOW_NATIVE_KERNELS=0; callers then use stock torch ops (same results to rounding).
The first call compiles (~20 s on 2 cores here); build ahead of time with
`python -c "from sae_core.sae import native; native.load()"`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).with_name("csrc")
# Every file the build reads. `code_fingerprint` hashes them with this module, so editing one
# changes the content address of whatever the kernels trained.
SOURCES = tuple(sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")))


def _cpu_tag() -> str:
    """A short digest of this CPU's feature flags: -march=native builds must not be shared
    between machines with different instruction sets."""
    try:
        flags = next(
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


def _source_tag() -> str:
    """A short digest of every source file's name and bytes."""
    digest = hashlib.sha256()
    for path in SOURCES:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:8]


def _env_tag() -> str:
    """The environment the build links against: two checkouts' venvs (other torch include
    paths) sharing one build folder would each find the other's build stale and recompile."""
    import torch

    return hashlib.sha256(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:8]


def _build_directory(name: str) -> Path:
    """The build's folder: `name` under TORCH_EXTENSIONS_DIR, else under torch's per-user cache."""
    from torch.utils.cpp_extension import get_default_build_root

    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()) / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _builder_lock(folder: Path) -> Iterator[None]:
    """One builder per build folder at a time, by an flock the kernel releases when its holder
    dies. torch's own lock (a `lock` file that waiters poll) outlives a builder killed mid-build
    and would make every later process wait forever; under this flock no live builder holds
    one, so any found is a dead builder's and is removed."""
    with open(folder / "saeflow-builder.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        yield


@cache
def load() -> ModuleType | None:
    """The compiled kernels (built once per source version and CPU into torch's extension cache)."""
    if os.environ.get("SAEFLOW_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load as build

        # Keyed by source and environment too: processes holding another version of these
        # files or another venv (a concurrent test run, another checkout) build elsewhere
        # instead of overwriting this build.
        name = f"saeflow_sparse_kernels_{_cpu_tag()}_{_source_tag()}_{_env_tag()}"
        folder = _build_directory(name)
        with _builder_lock(folder):
            return build(
                name=name,
                sources=[str(p) for p in SOURCES if p.suffix == ".cpp"],
                build_directory=str(folder),
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
    except Exception as err:  # noqa: BLE001 - no compiler/headers: fall back to stock ops
        warnings.warn(
            f"native SAE kernels unavailable ({type(err).__name__}); using stock torch ops",
            stacklevel=2,
        )
        return None
