"""The part below the hook runs once and is shared: the split model equals the plain forward."""

from __future__ import annotations

import pytest
import torch

from sae_core.data.models import decoder_layers, forward_with_replacement
from sae_core.evaluation.splice import SplitModel
from tests.helpers.tiny_models import BUILDERS

HOOKS = ["resid_pre.0", "resid_post.1", "attn_out.2", "mlp_in.1", "mlp_out.3"]


@pytest.fixture(scope="module", params=list(BUILDERS))
def model(request):
    return BUILDERS[request.param]()


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def _counting(blocks: list[torch.nn.Module]) -> tuple[list[list[int]], list]:
    """A call log per block, and the hook handles to remove."""
    logs: list[list[int]] = [[] for _ in blocks]
    handles = [
        b.register_forward_hook(lambda *_, log=log: log.append(1))
        for b, log in zip(blocks, logs, strict=True)
    ]
    return logs, handles


@pytest.mark.parametrize("hook", HOOKS)
def test_split_equals_the_full_forward(model, ids, hook):
    split = SplitModel(model, hook)
    with torch.inference_mode():
        captured = split.capture(ids)
        assert (captured.block_input is not None) == hook.startswith(("attn_out", "mlp"))
        clean = model(input_ids=ids).logits
        assert torch.equal(split.logits(ids, captured.act, captured.block_input), clean)
        edited = captured.act * 0.5 + 1
        reference = forward_with_replacement(model, ids, hook, lambda h: h * 0.5 + 1)
        got = split.logits(ids, edited, captured.block_input)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        tail = split.logits(ids, edited, captured.block_input, keep=3)
        torch.testing.assert_close(tail, reference[:, -3:], rtol=1e-5, atol=1e-5)


def test_blocks_below_the_hook_do_not_run_above_it(model, ids):
    split = SplitModel(model, "mlp_out.2")
    layers = decoder_layers(model)
    (below, hooked, above), handles = _counting([layers[1], layers[2], layers[3]])
    with torch.inference_mode():
        captured = split.capture(ids)
        assert (len(below), len(hooked), len(above)) == (1, 0, 0)  # stopped inside block 2
        for _ in range(3):
            split.logits(ids, captured.act, captured.block_input)
    for handle in handles:
        handle.remove()
    assert (len(below), len(hooked), len(above)) == (1, 3, 3)
    assert all(isinstance(block, type(layers[3])) for block in layers)  # originals restored
