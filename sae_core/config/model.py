"""The `model` section: which model, which hook, and how it runs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

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
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    compile: bool = Field(
        False,
        description="Extract through torch.compile (inductor, weights frozen): faster on a CPU "
        "in bfloat16 after 20-40 s of compiling, so for long extractions; resid_post hooks only.",
    )
