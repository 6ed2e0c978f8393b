"""The Triton kernels' tests run on CPU under Triton's interpreter where there is no GPU
(TRITON_INTERPRET, set by tests/conftest.py before any module imports the kernels). Each module
skips, with the reason, where triton is absent."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def device() -> torch.device:
    """Where the kernels run: the GPU when there is one, else the interpreter's CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
