"""Whether a device computes in bfloat16 natively: what `model.dtype=auto` resolves by.

bfloat16 weights pay where the matrix units take bf16 operands: x86 CPUs with AVX512-BF16 or
AMX-BF16, Arm CPUs with the BF16 extension (BFMMLA), NVIDIA GPUs from Ampere (compute
capability 8.0) on. Elsewhere PyTorch emulates bf16 GEMMs and bf16 would only lose precision.
On AVX512-BF16, bf16 extracted at 1.8x (eager) and 2.1x (compiled) float32's tokens/s, and a
demo SAE trained on its activations matched float32's within seed noise
(docs/results/research/README.md). A leaf: torch is imported only to ask about a GPU.
"""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
# x86 `flags` (AVX512-BF16, AMX-BF16) and Arm `Features` (the BF16 extension) with bf16 units.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
AMPERE = (8, 0)


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of /proc/cpuinfo's text: x86's `flags` and Arm's `Features` lines."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_bf16(cpuinfo: Path | None = None) -> bool:
    """Whether this machine's CPU (or `cpuinfo`'s) has bf16 matrix units; False where
    /proc/cpuinfo is absent."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return False
    return bool(cpu_flags(text) & BF16_CPU_FLAGS)


def has_native_bf16(device: str) -> bool:
    """Whether `device` (auto, cpu, cuda or cuda:N, as model.device names it) computes in bf16
    natively. `auto` is the GPU when one is visible, as sae_core.device.pick_device picks."""
    if device == "cpu":
        return cpu_has_bf16()
    if device != "auto" and not device.startswith("cuda"):
        return False  # not a device: pick_device names the error when the run starts
    import torch  # only here: the CPU's answer needs no torch

    if not torch.cuda.is_available():
        return device == "auto" and cpu_has_bf16()
    try:
        index = None if device in ("auto", "cuda") else torch.device(device).index
        return torch.cuda.get_device_capability(index) >= AMPERE
    except (RuntimeError, AssertionError, ValueError):
        return False  # a GPU that is not there: pick_device names the error
