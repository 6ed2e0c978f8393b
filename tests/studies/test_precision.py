"""Comparing two activations datasets row by row: the relative error of a lower precision."""

from __future__ import annotations

import pytest
import torch

from sae_core.storage.store import Store
from sae_core.studies.precision import activation_error
from tests.helpers.activations import write_activations


def test_activation_error_compares_row_by_row(tmp_path):
    store = Store(str(tmp_path / "store"))
    x = torch.randn(512, 16)
    noisy = x.clone()
    noisy[:, 0] += 0.01 * x.norm(dim=1)  # each token off by exactly 1% of its norm
    reference = write_activations(store, "activations/a", x, x)
    other = write_activations(store, "activations/b", x, noisy)
    error = activation_error(reference, other)
    assert error.rows == 512
    assert error.median_token_error == pytest.approx(0.01, rel=1e-4)
    assert error.p99_token_error == pytest.approx(0.01, rel=1e-4)
    assert error.relative_error == pytest.approx(0.01, rel=1e-4)
    assert activation_error(reference, reference).relative_error == 0.0
