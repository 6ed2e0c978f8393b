"""What a training run needs of the machine: memory for its state, and a device per rank.

Preflight checks these before any heavy work; the train stage sizes its groups by them.
"""

from __future__ import annotations

import torch

from sae_core.config import SAEConfig, TrainConfig
from sae_core.device import pick_device
from sae_core.errors import ConfigError


def training_bytes(sae: SAEConfig, width: int) -> int:
    """A lower bound on training memory: each dense [n, d] float32 matrix (TopK, Matryoshka,
    transcoders: encoder and decoder; an untied expander: its encoder) with its gradient and two
    Adam moments."""
    dense = 2 if sae.kind != "expander" else 1 if sae.encoder == "untied" else 0
    return dense * 4 * 4 * sae.n_latents * width


def check_world_size(train: TrainConfig) -> None:
    """One rank per GPU on CUDA; on CPU any count (each rank gets cores / W threads)."""
    if pick_device(train.device).type != "cuda":
        return
    if train.world_size > (gpus := torch.cuda.device_count()):
        raise ConfigError(
            f"train.world_size={train.world_size} exceeds the {gpus} GPU(s) visible here; "
            f"choose train.world_size <= {gpus} or train.device=cpu"
        )
