"""Which torch device to run on: "auto" picks CUDA when there is one, else the CPU."""

from __future__ import annotations

import torch

from sae_core.env import machine_memory
from sae_core.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` -> a torch.device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device '{name}': expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"device '{name}': no CUDA GPU is visible here; use device=auto or cpu"
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device '{name}': only {count} CUDA GPU(s) visible; use cuda:0..{count - 1}"
            )
    elif device.type != "cpu":
        raise ConfigError(f"device '{name}': expected auto, cpu, cuda or cuda:N")
    return device


def device_name(device: torch.device) -> str:
    """What a run records of the device it used: `cpu` or `cuda:N` (the GPU a bare `cuda` is)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def state_copies(device: torch.device, world_size: int) -> int:
    """How many copies of the training state `device`'s memory holds: one per data-parallel
    rank on the CPU (the ranks share this machine), one on a GPU (each rank has its own)."""
    return world_size if device.type == "cpu" else 1


def device_memory(device: torch.device) -> int:
    """Bytes of memory of a device: a GPU's own, else this machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory()
