"""Subprocess for the SIGKILL resume test: train on synthetic data with checkpoints on a store.

usage: python tests/helpers/resume_worker.py STORE_DIR OUT_FILE SLEEP_SECONDS_PER_BATCH
Writes the final weights to OUT_FILE (safetensors) when training completes.
"""

from __future__ import annotations

import sys
import time

import torch

from sae_core.config import SAEConfig, TrainConfig
from sae_core.storage.store import Store
from sae_core.training.group import run_training, tensor_source


def main(store_dir: str, out_file: str, sleep_s: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g) @ torch.randn(32, 32, generator=g)
    sae_cfg = SAEConfig(n_latents=128, k=4, dead_window_tokens=512)
    train_cfg = TrainConfig(batch_size=64, epochs=2, lr=1e-3, checkpoint_every_tokens=640)
    inner = tensor_source(x, 64, 0)

    def source(epoch: int, start: int):
        for batch in inner(epoch, start):
            time.sleep(sleep_s)  # widens the window in which the test's SIGKILL lands
            yield batch

    trainer = run_training(
        32,
        sae_cfg,
        train_cfg,
        source,
        len(x) // 64,
        lambda: x[:1024],
        store=Store(store_dir),
        checkpoint_dir="ckpt",
        progress=False,
    )
    trainer.sae.save_safetensors(out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
