"""Subprocess for the SIGKILL extraction test: extract one hook into a resumable dataset.

usage: python tests/helpers/extract_worker.py MODEL_DIR STORE_DIR TOKENS_PATH SLEEP_SECONDS_PER_BATCH
"""

from __future__ import annotations

import sys
import time

from sae_core.config import DataConfig
from sae_core.data.activations import extract_activations
from sae_core.data.models import load_model
from sae_core.storage.refs import DatasetRef
from sae_core.storage.store import Store

DATA = DataConfig(context_len=16, batch_tokens=64, shard_rows=50)


def main(model_dir: str, store_dir: str, tokens_path: str, sleep_s: float) -> None:
    model = load_model(model_dir, device="cpu").model
    # Widens the window in which the test's SIGKILL lands: a pause before every forward pass.
    model.model.layers[0].register_forward_pre_hook(lambda *_: time.sleep(sleep_s))
    store = Store(store_dir)
    tokens = DatasetRef(store=store.uri, path=tokens_path, fingerprint="tokens")
    with store.resuming("activations/killed") as writer:
        extract_activations(model, tokens, DATA, "resid_post.1", writer, progress=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))
