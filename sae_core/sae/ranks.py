"""The data-parallel group a training process belongs to, and the few collectives training needs.

`Ranks()` is a single process: every collective is the identity, so single-process training
runs exactly the code (and computes exactly the bits) it did before data parallelism. Inside a
torchrun worker, `Ranks.from_env()` joins the process group (gloo on CPU, NCCL on CUDA, one GPU
per rank by LOCAL_RANK). Each rank holds an equal slice of every global batch; a loss term is
written as (this rank's sum) / (the global batch's normaliser), so summing gradients over ranks
gives the gradient of the global batch's loss.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from sae_core.device import pick_device
from sae_core.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: rank r of world_size (0 of 1 alone)."""

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes checkpoints and outputs and shows progress."""
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch of batch_size rows (contiguous, equal slices)."""
        per_rank = batch_size // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """t summed over ranks, in place; returns t. One all-reduce of t.numel() elements."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """t's element-wise maximum over ranks, in place; returns t."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """t's element-wise minimum over ranks, in place; returns t."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """[m, ...] on every rank (same shape) -> [world_size * m, ...], rank order."""
        if not self.distributed:
            return t
        out = t.new_empty((self.world_size * t.shape[0], *t.shape[1:]))
        dist.all_gather_into_tensor(out, t.contiguous())
        return out

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` with rank 0's, in place (one broadcast each)."""
        if self.distributed:
            for t in tensors:
                dist.broadcast(t, src=0)

    def batch_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean over the global batch of x: [b, d] per rank -> [d] (x.mean(0) alone)."""
        if not self.distributed:
            return x.mean(dim=0)
        return self.sum_(x.sum(dim=0)) / (x.shape[0] * self.world_size)

    def batch_spread(self, x: torch.Tensor) -> torch.Tensor:
        """sum |x - mean|^2 over the global batch, x: [b, d] per rank -> []. Centred first, so
        nothing cancels when the data sit far from 0."""
        return self.sum_((x - self.batch_mean(x)).pow(2).sum())

    @classmethod
    def from_env(cls, device_name: str) -> tuple[Ranks, torch.device]:
        """Join the torchrun group (RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous in the
        environment) and pick this rank's device: cuda:LOCAL_RANK on GPUs, else the CPU."""
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        device = pick_device(device_name)
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                raise ConfigError(
                    f"train.world_size: local rank {local} has no GPU ({torch.cuda.device_count()} "
                    "visible); lower train.world_size to the GPUs per node or set train.device=cpu"
                )
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                rank=rank,
                world_size=world,
                device_id=device if device.type == "cuda" else None,
            )
        return cls(rank, world), device

    @staticmethod
    def leave() -> None:
        """Leave the process group at the end of a worker, once every rank is there (a rank
        tearing down while a peer still talks to it can abort the peer)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


SINGLE = Ranks()
