"""The `train` section: the recipe, its optimiser settings, and how a run executes (device, ranks,
nodes, data lanes)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sae_core.config.common import Seed, Strict

# How a run executes, not what it computes: left out of the SAE's address and of the check that
# a checkpoint belongs to the run resuming it (a run may resume on another device or rank count).
TRAIN_EXECUTION_FIELDS = frozenset({"device", "world_size", "nnodes", "node_rank", "rendezvous"})


class TrainConfig(Strict):
    batch_size: int = Field(4096, ge=1, description="Tokens per optimiser step.")
    epochs: int = Field(1, ge=1, description="Passes over the data (unless train.tokens is set).")
    tokens: int | None = Field(
        None,
        ge=1,
        description="Training tokens in all, taking as many passes over the data as that needs "
        "(the last one cut short); None: train.epochs whole passes.",
    )
    recipe: Literal["budget", "paper"] = Field(
        "budget",
        description="paper: Gao et al.'s constant 2e-4 / sqrt(n / 2^14); budget: that rate raised "
        "for short runs, 5% linear warm-up, linear decay to zero (sae_core.training.recipe).",
    )
    lr: float | None = Field(None, gt=0, description="Peak learning rate; None: the recipe's.")
    lr_warmup: float | None = Field(
        None, ge=0, lt=1, description="Fraction of the steps warming up; None: the recipe's."
    )
    lr_decay: Literal["none", "linear"] | None = Field(
        None, description="none or linear (to zero at the last step); None: the recipe's."
    )
    seed: Seed = 0
    checkpoint_every_tokens: int = Field(2**16, ge=1)
    grad_clip_norm: float | None = Field(None, gt=0, description="Gradient-norm clip; None: off")
    adam_eps: float = Field(
        6.25e-10,
        gt=0,
        description="Adam's epsilon (Gao et al.: 6.25e-10). A gradient far below it moves its "
        "weight by about lr * gradient / eps instead of about lr.",
    )
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Keep an exponential moving average of the weights (e.g. 0.999) and save it "
        "as the trained SAE; None: off.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="Precision of the encoder GEMM (the step's one dense product); the rest "
        "stays float32. float32 is deterministic; bfloat16 pays off on GPUs and CPUs with bf16 units.",
    )
    device: str = "auto"
    world_size: int = Field(
        1,
        ge=1,
        le=1024,
        description="Data-parallel processes on this node (torch.distributed, launched with "
        "torchrun): each of the world_size x nnodes ranks takes an equal slice of every batch. "
        "1 on one node: one process, no launcher. "
        "Not part of the SAE's address (like device: same computation, up to float rounding).",
    )
    nnodes: int = Field(
        1,
        ge=1,
        le=1024,
        description="Nodes of a data-parallel run, each running world_size processes against a "
        "store every node reaches; world_size x nnodes ranks in all, rank 0 (on node 0) commits. "
        "Not part of the SAE's address.",
    )
    node_rank: int = Field(
        0, ge=0, description="This node's place, 0 .. train.nnodes - 1 (node 0 commits the SAE)."
    )
    rendezvous: str | None = Field(
        None,
        description="HOST:PORT where node 0 meets the others (torchrun's master address and "
        "port; every node gives the same); needed when train.nnodes > 1.",
    )
    data_lanes: int = Field(
        8,
        ge=1,
        le=4096,
        description="Independent streams every batch is drawn from, each reading its own "
        "1/data_lanes of the split (sae_core.storage.loader): a data-parallel rank reads only "
        "its lanes, so world_size x nnodes must divide it. Part of the batch order, hence of "
        "the SAE's address.",
    )

    @model_validator(mode="after")
    def _tokens_or_epochs(self) -> TrainConfig:
        if self.tokens is not None and self.epochs != 1:
            raise ValueError(
                f"train.tokens={self.tokens} and train.epochs={self.epochs} both set the run's "
                "length; set one of them"
            )
        if self.tokens is not None and self.tokens < self.batch_size:
            raise ValueError(
                f"train.tokens={self.tokens} is less than one batch (train.batch_size="
                f"{self.batch_size}); raise train.tokens or lower train.batch_size"
            )
        if self.ema_decay is not None and self.recipe == "budget":
            raise ValueError(
                "train.ema_decay: the budget recipe ships schedule-free Adam's average of the "
                "weights already; drop train.ema_decay or set train.recipe=paper"
            )
        return self

    @property
    def ranks(self) -> int:
        """Data-parallel processes in all: world_size on each of nnodes nodes."""
        return self.world_size * self.nnodes

    @model_validator(mode="after")
    def _batch_splits_over_ranks(self) -> TrainConfig:
        ranks = (
            f"train.world_size={self.world_size}"
            if self.nnodes == 1
            else f"train.world_size={self.world_size} x train.nnodes={self.nnodes} = {self.ranks}"
        )
        if self.batch_size % self.ranks:
            raise ValueError(
                f"{ranks} does not divide train.batch_size={self.batch_size}; choose a "
                "train.batch_size that is a multiple of it (each rank takes an equal slice)"
            )
        if self.data_lanes % self.ranks:
            raise ValueError(
                f"{ranks} does not divide train.data_lanes={self.data_lanes}; set "
                "train.data_lanes to a multiple of it (each rank reads whole lanes; the SAE "
                "then gets a new address, as the batch order changes)"
            )
        return self

    @model_validator(mode="after")
    def _nodes(self) -> TrainConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(
                f"train.node_rank={self.node_rank} is not below train.nnodes={self.nnodes}; "
                f"number the nodes 0 .. {self.nnodes - 1}"
            )
        if self.rendezvous is not None:
            host, _, port = self.rendezvous.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(
                    f"train.rendezvous={self.rendezvous!r} is not HOST:PORT; give node 0's "
                    "address and a free port every node reaches, e.g. 10.0.0.1:29500"
                )
        elif self.nnodes > 1:
            raise ValueError(
                f"train.nnodes={self.nnodes} needs train.rendezvous=HOST:PORT: node 0's "
                "address and a free port, the same on every node"
            )
        return self
