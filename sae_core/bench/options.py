"""Each benchmark's options, declared once: name, type, default and description per field.

The benchmark takes its options object, and `saeflow bench NAME` builds one command-line option
per field (flows/cli/bench.py), so a default lives only here. Imports pydantic alone: the CLI
reads these classes at start-up, before any command runs.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

DeviceName = Annotated[str, Field(description="Where it runs: auto, cpu, cuda or cuda:N.")]


class BenchOptions(BaseModel):
    """Options of one benchmark run; an unknown name is an error, not a silent no-op."""

    # defer_build: the validator is built on first use, not at every start of the CLI.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class TrainBench(BenchOptions):
    """`saeflow bench train`: SAE training steps against one dense GEMM of the same shape."""

    d: int = Field(576, description="Width of the activations.")
    n: int = Field(4608, description="Latents of the SAE.")
    k: int = Field(32, description="Active latents per token.")
    batch: int = Field(4096, description="Tokens per training step.")
    steps: int = Field(10, description="Timed steps, after the warm-up.")
    device: DeviceName = "auto"
    kind: str = Field(
        "topk", description="SAE kind: topk, expander or matryoshka (its default prefixes)."
    )
    degree: int | None = Field(None, description="Expander: non-zeros per decoder direction.")
    encoder: str = Field("untied", description="Expander encoder: untied or tied.")
    dtype: str = Field(
        "float32", description="The step's GEMM precision (train.dtype): float32 or bfloat16."
    )


class ExtractBench(BenchOptions):
    """`saeflow bench extract`: extraction against the bare truncated and the full forward."""

    model: str = Field("smollm2-135m", description="Demo asset name or HF model folder.")
    hook: list[str] = Field(["resid_post.15"], description="Hook point (repeatable).")
    tokens: int = Field(8192, description="Tokens per pass (random ids).")
    context_len: int = Field(64, description="Tokens per context.")
    batch_tokens: int = Field(2048, description="Tokens per forward batch.")
    shard_mb: float = Field(4.0, description="Size of one activation shard in MiB.")
    storage_dtype: str = Field("float32", description="Stored activations: float32 or float16.")
    dtype: str = Field(
        "float32", description="The model's weights (model.dtype): float32 or bfloat16."
    )
    compile: bool = Field(
        False, description="Extract and run the bare forward through torch.compile (model.compile)."
    )
    repeats: int = Field(3, description="Timed passes of each kind.")
    device: DeviceName = "auto"


class SyntheticData(BenchOptions):
    """The Gaussian activations dataset the data-loading benchmarks write, then train on."""

    width: int = Field(576, description="Width of the activations.")
    dtype: str = Field("float32", description="Stored activations: float32 or float16.")
    batch: int = Field(4096, description="Rows per training batch.")
    shard_mb: float = Field(128.0, description="Size of one activation shard in MiB.")


class LoadBench(SyntheticData):
    """`saeflow bench load`: write, read, stream and train on each store."""

    rows: int = Field(2**19, description="Rows of the dataset (train split).")
    buffer_tokens: int = Field(2**16, description="Rows of the shuffle buffer.")
    train_steps: int = Field(30, description="Training steps fed by the loader.")


class GroupBench(SyntheticData):
    """`saeflow bench group`: several SAEs one after another against one group."""

    n: list[int] = Field([1152, 2304, 4608], description="Latents of one SAE (repeatable).")
    k: int = Field(32, description="Active latents of every SAE.")
    rows: int = Field(2**17, description="Rows of the dataset (train split).")
    repeats: int = Field(1, description="Timed rounds of both ways.")


class CliBench(BenchOptions):
    """`saeflow bench cli`: start-up seconds of the installed `saeflow` command."""

    repeats: int = Field(5, ge=1, description="Runs of each command.")


class HashBench(BenchOptions):
    """`saeflow bench hash`: seconds to fingerprint a model's files by content."""

    model: str = Field("smollm2-135m", description="Demo asset name or HF model folder.")
    repeats: int = Field(5, ge=1, description="Runs with the digests remembered.")
