"""What a run records of its device: `auto` resolved, a bare `cuda` named by its index."""

from __future__ import annotations

import pytest
import torch

from sae_core.device import device_name, pick_device


def test_cpu_is_named_cpu():
    assert device_name(pick_device("cpu")) == "cpu"


def test_auto_is_recorded_as_the_device_it_picked():
    expected = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    assert device_name(pick_device("auto")) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_a_bare_cuda_gets_its_index():
    assert device_name(torch.device("cuda")) == f"cuda:{torch.cuda.current_device()}"
    assert device_name(torch.device("cuda:0")) == "cuda:0"
