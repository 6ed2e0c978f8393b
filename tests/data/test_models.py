from __future__ import annotations

import pytest
import torch

from sae_core.data.models import (
    HookPoint,
    check_hook,
    forward_with_replacement,
    hook_module,
    load_model,
    num_layers,
    run_to_hook,
)
from sae_core.device import pick_device
from sae_core.errors import ConfigError
from tests.helpers.tiny_models import BUILDERS

LAYERS = {"llama": "model.layers", "gpt2": "transformer.h", "neox": "gpt_neox.layers"}


@pytest.fixture(scope="module", params=list(BUILDERS))
def arch(request):
    return request.param, BUILDERS[request.param]()


@pytest.fixture
def ids():
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def _layers(model, name):
    node = model
    for attr in LAYERS[name].split("."):
        node = getattr(node, attr)
    return node


def test_hookpoint_parse_roundtrip():
    point = HookPoint.parse("resid_post.15")
    assert point == HookPoint("resid_post", 15)
    assert str(point) == "resid_post.15"
    assert HookPoint.parse(point) is point
    for bad in ("resid.3", "resid_post.x", "resid_post", "foo.1"):
        with pytest.raises(ConfigError, match="model.hook"):
            HookPoint.parse(bad)


def test_check_hook_names_the_valid_range(arch):
    _, model = arch
    assert num_layers(model.config) == 4
    assert check_hook(model.config, "resid_post.3") == HookPoint("resid_post", 3)
    with pytest.raises(ConfigError, match=r"model\.hook.*4 layers.*0\.\.3"):
        check_hook(model.config, "resid_post.4")


def test_hook_module_finds_blocks_and_sublayers(arch):
    name, model = arch
    layers = _layers(model, name)
    assert hook_module(model, "resid_post.2") is layers[2]
    assert hook_module(model, "resid_pre.1") is layers[1]
    assert hook_module(model, "mlp_out.0") is layers[0].mlp
    attn = hook_module(model, "attn_out.0")
    assert attn in list(layers[0].children()) and "att" in type(attn).__name__.lower()


@torch.inference_mode()
def test_run_to_hook_matches_hidden_states(arch, ids):
    _, model = arch
    hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for layer in (0, 1, 2):  # not the last: HF applies the final norm to that hidden state
        got = run_to_hook(model, ids, f"resid_post.{layer}")
        assert got.shape == (2, 12, 64)
        torch.testing.assert_close(got, hidden[layer + 1], rtol=0, atol=0)
        torch.testing.assert_close(
            run_to_hook(model, ids, f"resid_pre.{layer + 1}"), hidden[layer + 1]
        )
    torch.testing.assert_close(run_to_hook(model, ids, "resid_pre.0"), hidden[0])


@torch.inference_mode()
def test_run_to_hook_skips_later_layers(arch, ids):
    name, model = arch
    hooks_before = len(_layers(model, name)[1]._forward_hooks)
    calls = {"later": 0, "head": 0}
    handles = [
        layer.register_forward_hook(lambda *_: calls.__setitem__("later", calls["later"] + 1))
        for layer in _layers(model, name)[2:]
    ]
    handles.append(
        model.get_output_embeddings().register_forward_hook(
            lambda *_: calls.__setitem__("head", calls["head"] + 1)
        )
    )
    try:
        run_to_hook(model, ids, "resid_post.1")
        assert calls == {"later": 0, "head": 0}
        model(input_ids=ids, use_cache=False)  # the counters do count a full pass
        assert calls == {"later": 2, "head": 1}
    finally:
        for h in handles:
            h.remove()
    # No hook is left behind.
    assert len(_layers(model, name)[1]._forward_hooks) == hooks_before


@torch.inference_mode()
@pytest.mark.parametrize("hook", ["resid_post.1", "resid_pre.2", "mlp_out.1", "attn_out.1"])
def test_forward_with_replacement(arch, ids, hook):
    _, model = arch
    clean = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(
        forward_with_replacement(model, ids, hook, None), clean, rtol=0, atol=0
    )
    same = forward_with_replacement(model, ids, hook, lambda x: x.clone())
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    zeroed = forward_with_replacement(model, ids, hook, torch.zeros_like)
    assert zeroed.shape == clean.shape == (2, 12, 512)
    assert (zeroed - clean).abs().max() > 1e-4
    # The replacement is gone afterwards.
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, clean, rtol=0, atol=0)


def test_replacement_sees_the_hook_activation(arch, ids):
    _, model = arch
    seen = []
    with torch.inference_mode():
        forward_with_replacement(model, ids, "resid_post.1", lambda x: seen.append(x) or x)
        expected = run_to_hook(model, ids, "resid_post.1")
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)


def test_load_model(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir), device="cpu")
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert num_layers(loaded.config) == 4
    assert loaded.tokenizer.eos_token_id == loaded.config.eos_token_id
    ids = torch.tensor([loaded.tokenizer("The old man saw a dog .")["input_ids"]])
    with torch.inference_mode():
        assert run_to_hook(loaded.model, ids, "resid_post.2").shape == (1, 7, 64)
    half = load_model(str(tiny_llama_dir), dtype="bfloat16", device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path.*no such"):
        load_model(str(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"model\.path.*cannot load"):
        load_model(str(corrupt))
    with pytest.raises(ConfigError, match=r"model\.dtype"):
        load_model(str(corrupt), dtype="int8")


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="expected auto, cpu"):
        pick_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            pick_device("cuda")


def test_a_transcoder_reads_a_hook_that_fires_before_the_one_it_writes():
    from sae_core.data.models import check_transcoder_hooks

    check_transcoder_hooks("mlp_in.3", "mlp_out.3")
    check_transcoder_hooks("resid_pre.3", "mlp_out.3")
    check_transcoder_hooks("resid_post.2", "attn_out.3")
    for hook_in in ("resid_post.3", "mlp_out.3", "mlp_in.4"):
        with pytest.raises(ConfigError, match="fires before model.hook"):
            check_transcoder_hooks(hook_in, "mlp_out.3")
