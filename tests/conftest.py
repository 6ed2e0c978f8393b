"""Shared fixtures: a tiny random Llama with a word-level tokenizer, and a small generated corpus.

Everything is built from configs and seeded generators: no hub download, seconds to build.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests keep their state (store, MLflow, Prefect home) out of the working directory.
os.environ.setdefault("SAEFLOW_HOME", tempfile.mkdtemp(prefix="saeflow-test-home-"))
# Triton kernels are built interpreted or compiled when first defined, by whichever test module
# imports them first: without a GPU, every one must find the interpreter on.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sae_core.env import apply_runtime_env  # noqa: E402
from tests.helpers.tiny_models import build_tiny_llama, build_tokenizer, write_corpus  # noqa: E402

# What the entry points (flows/) set, before transformers, datasets, prefect or mlflow import.
apply_runtime_env()


@pytest.fixture(scope="session", autouse=True)
def cpu_without_bf16_units() -> Iterator[None]:
    """model.dtype=auto resolves as on a CPU without bf16 units, so that a test's numbers do not
    depend on the machine it runs on (session-wide: module fixtures build configs too); tests of
    that resolution give their own cpuinfo."""
    from sae_core import bf16_support

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bf16_support, "CPUINFO", Path(os.devnull))
        yield


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama (d=64, 4 layers, vocab 512) with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_tiny_llama(eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three jsonl files, 60 generated documents {doc_id, genre, text}, ~19k tokens in all."""
    folder = tmp_path_factory.mktemp("tiny-corpus")
    write_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def prefect():
    """One ephemeral Prefect API for the whole session (starting one costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (the moment it is returned)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def one_thread():
    """Tiny SAEs: one thread is faster on a busy machine, and results do not depend on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stop_request():
    """A stop request (sae_core.stopping) a test makes ends with the test."""
    from sae_core import stopping

    stopping.reset()
    yield
    stopping.reset()
