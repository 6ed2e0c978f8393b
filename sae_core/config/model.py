"""The `model` section: which model, which hook, and how it runs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sae_core.bf16_support import has_native_bf16
from sae_core.config.common import Strict


class ModelConfig(Strict):
    path: str = Field(
        "smollm2-135m",
        description="A demo asset name (see `saeflow assets`), a local HF model folder, or a hub id.",
    )
    hook: str = Field("resid_post.15", pattern=r"^[a-z_]+\.\d+$", description="e.g. resid_post.15")
    hook_out: str | None = Field(
        None,
        pattern=r"^[a-z_]+\.\d+$",
        description="Transcoders only: the hook they reconstruct from model.hook, e.g. mlp_out.6 "
        "read from mlp_in.6; None for an SAE (it reconstructs model.hook itself).",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="The model's weights. auto: bfloat16 where model.device has bf16 units (x86 "
        "AVX512-BF16 or AMX, Arm BF16, NVIDIA Ampere on), else float32; resolved when the "
        "config is read, so content addresses and records name the dtype that ran.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool = Field(
        False,
        description="Extract through torch.compile (inductor, weights frozen): faster on a CPU "
        "in bfloat16 after 20-40 s of compiling, so for long extractions; resid_post hooks only.",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_auto_dtype(cls, data: Any) -> Any:
        # Once, here: every stage's content address and every record then names what ran.
        if isinstance(data, dict) and data.get("dtype", "auto") == "auto":
            native = has_native_bf16(str(data.get("device", "auto")))
            return {**data, "dtype": "bfloat16" if native else "float32"}
        return data
