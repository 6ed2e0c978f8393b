"""`model.dtype=auto`: bfloat16 exactly where the device has bf16 units, resolved when read."""

from __future__ import annotations

from pathlib import Path

import pytest

from sae_core import bf16_support
from sae_core.config import ModelConfig, load_config

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8\n"
X86_AVX512_ONLY = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve i8mm bf16\n"
ARM_PLAIN = "Features\t: fp asimd evtstrm aes crc32\n"


@pytest.mark.parametrize(
    ("cpuinfo", "native"),
    [
        (X86_BF16, True),
        (X86_AMX, True),
        (X86_AVX512_ONLY, False),
        (ARM_BF16, True),
        (ARM_PLAIN, False),
    ],
)
def test_cpu_bf16_units_are_read_from_cpuinfo(tmp_path: Path, cpuinfo: str, native: bool):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert bf16_support.cpu_has_bf16(path) is native


def test_a_machine_without_cpuinfo_has_no_bf16_units(tmp_path: Path):
    assert bf16_support.cpu_has_bf16(tmp_path / "absent") is False


@pytest.mark.parametrize(
    ("cpuinfo", "resolved"), [(X86_BF16, "bfloat16"), (X86_AVX512_ONLY, "float32")]
)
def test_auto_resolves_by_the_cpu_when_the_config_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpuinfo: str, resolved: str
):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    monkeypatch.setattr(bf16_support, "CPUINFO", path)
    assert ModelConfig(device="cpu").dtype == resolved
    assert load_config("demo", ["model.device=cpu"]).model.dtype == resolved
    # A dtype given is kept, whatever the CPU.
    assert ModelConfig(device="cpu", dtype="float32").dtype == "float32"
    assert ModelConfig(device="cpu", dtype="bfloat16").dtype == "bfloat16"


def test_the_resolved_dtype_is_what_the_config_records():
    cfg = load_config("demo", [])
    assert cfg.model.dtype in ("float32", "bfloat16")
    assert cfg.model.dtype == ("bfloat16" if bf16_support.has_native_bf16("auto") else "float32")


def test_a_device_that_is_not_one_is_left_to_pick_device():
    assert bf16_support.has_native_bf16("tpu") is False
