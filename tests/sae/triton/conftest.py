"""The Triton kernels' tests run on CPU under Triton's interpreter where there is no GPU. The
kernels are built interpreted or compiled when first defined, so TRITON_INTERPRET is set here,
before any test module imports them. Each module skips, with the reason, where triton is absent."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the interpreter's CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
