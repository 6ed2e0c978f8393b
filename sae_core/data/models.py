"""Loading HF causal LMs, naming hook points, running to a hook and splicing at a hook.

A hook is `KIND.LAYER`:
- `resid_pre.L`: the residual stream entering decoder block L;
- `resid_post.L`: the residual stream leaving decoder block L (HF `hidden_states[L + 1]`,
  except for the last block, whose HF hidden state has the final norm applied);
- `attn_out.L` / `mlp_out.L`: the attention / MLP sublayer output of block L, before it is
  added to the residual stream;
- `mlp_in.L`: the MLP sublayer's input in block L (after its pre-MLP norm, e.g. Llama's
  post_attention_layernorm): what a transcoder of `mlp_out.L` reads.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from sae_core import stopping
from sae_core.data.assets import resolve_model_path
from sae_core.data.hub import transformers_bars_off
from sae_core.device import pick_device
from sae_core.env import hub_offline
from sae_core.errors import ConfigError

# In the order they fire within a block.
HOOK_KINDS = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
# Hooks read at their module's input (a forward pre-hook), the others at its output.
_INPUT_HOOKS = ("resid_pre", "mlp_in")

# Where each architecture keeps its decoder blocks, and its sublayer names inside a block.
_LAYER_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
_SUBLAYER_NAMES = {
    "attn_out": ("self_attn", "attn", "attention"),
    "mlp_out": ("mlp", "feed_forward"),
    "mlp_in": ("mlp", "feed_forward"),
}


@dataclass(frozen=True)
class HookPoint:
    kind: str
    layer: int

    @classmethod
    def parse(cls, text: str | HookPoint) -> HookPoint:
        """`"resid_post.15"` -> HookPoint("resid_post", 15)."""
        if isinstance(text, HookPoint):
            return text
        kind, _, layer = str(text).partition(".")
        if kind not in HOOK_KINDS or not layer.isdigit():
            raise ConfigError(
                f"model.hook '{text}': expected KIND.LAYER with KIND one of {', '.join(HOOK_KINDS)}, "
                "e.g. resid_post.15"
            )
        return cls(kind, int(layer))

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    def precedes(self, other: HookPoint) -> bool:
        """Whether this hook fires before `other` in a forward pass (so replacing `other`'s
        activation leaves this one's unchanged)."""
        order = (self.layer, HOOK_KINDS.index(self.kind))
        return order < (other.layer, HOOK_KINDS.index(other.kind))


class LoadedModel(NamedTuple):
    model: nn.Module
    tokenizer: Any
    config: Any


def _text_config(config: Any) -> Any:
    # Multimodal configs keep the language model's settings in a sub-config.
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def num_layers(config: Any) -> int:
    """Number of decoder blocks of an HF config."""
    config = _text_config(config)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ConfigError(
        f"model: cannot tell the depth of a {type(config).__name__}; use a decoder-only LM"
    )


def model_width(config: Any) -> int:
    """Width d of the residual stream (and of every hook's activation) of an HF config."""
    width = getattr(_text_config(config), "hidden_size", None)  # GPT-2 maps n_embd to it
    if not isinstance(width, int):
        raise ConfigError(
            f"model: cannot tell the width of a {type(config).__name__}; use a decoder-only LM"
        )
    return width


def check_hook(config: Any, hook: str | HookPoint) -> HookPoint:
    """Parse `hook` and check its layer exists in the model; returns the HookPoint."""
    point = HookPoint.parse(hook)
    depth = num_layers(config)
    if point.layer >= depth:
        raise ConfigError(
            f"model.hook '{point}': the model has {depth} layers; choose a layer in 0..{depth - 1}"
        )
    return point


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    return layers_holder(model)[2]


def layers_holder(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """(the module holding the decoder blocks, its attribute name, the blocks)."""
    for path in _LAYER_PATHS:
        *parents, attr = path.split(".")
        holder: Any = model
        for name in parents:
            holder = getattr(holder, name, None)
        node = getattr(holder, attr, None)
        if isinstance(node, nn.ModuleList):
            return holder, attr, node
    raise ConfigError(
        f"model: cannot find the decoder blocks of {type(model).__name__} "
        f"(looked for {', '.join(_LAYER_PATHS)}); use a Llama, Mistral, Qwen, GPT-2 or GPT-NeoX model"
    )


def hook_module(model: nn.Module, hook: str | HookPoint) -> nn.Module:
    """The module whose output (or, for resid_pre, input) is the hook's activation."""
    point = check_hook(model.config, hook)
    block = decoder_layers(model)[point.layer]
    if point.kind in ("resid_pre", "resid_post"):
        return block
    for name in _SUBLAYER_NAMES[point.kind]:
        sub = getattr(block, name, None)
        if isinstance(sub, nn.Module):
            return sub
    raise ConfigError(
        f"model.hook '{point}': {type(block).__name__} has no sublayer named "
        f"{' or '.join(_SUBLAYER_NAMES[point.kind])}; use resid_post"
    )


def check_transcoder_hooks(hook_in: str | HookPoint, hook_out: str | HookPoint) -> None:
    """ConfigError unless the transcoder's input hook fires before its output hook: splicing
    its output in must leave the input it reads unchanged."""
    point_in, point_out = HookPoint.parse(hook_in), HookPoint.parse(hook_out)
    if not point_in.precedes(point_out):
        raise ConfigError(
            f"model.hook_out={point_out} fires before model.hook={point_in}; a transcoder reads "
            f"an earlier hook than it writes, e.g. model.hook=mlp_in.{point_out.layer} for "
            f"mlp_out.{point_out.layer}"
        )


def _first(value: Any) -> Tensor:
    # HF blocks return a tensor (transformers 5) or a tuple led by it (older versions, attention).
    return value[0] if isinstance(value, tuple) else value


def _with_first(value: Any, new: Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


@contextmanager
def hooked(
    model: nn.Module, hook: str | HookPoint, fn: Callable[[Tensor], Tensor | None]
) -> Iterator[None]:
    """Call `fn(activation [B, T, d])` at the hook; a tensor it returns replaces the activation."""
    point = HookPoint.parse(hook)
    module = hook_module(model, point)
    if point.kind in _INPUT_HOOKS:

        def pre(_mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:

        def post(_mod: nn.Module, _args: tuple, output: Any) -> Any:
            new = fn(_first(output))
            return None if new is None else _with_first(output, new)

        handle = module.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


class _StopForward(Exception):
    """Raised from a hook to skip the rest of the forward pass."""


def run_to_hook(model: nn.Module, input_ids: Tensor, hook: str | HookPoint) -> Tensor:
    """The activation at `hook` for `input_ids: [B, T]` -> `[B, T, d]` (see run_to_hooks)."""
    return run_to_hooks(model, input_ids, [hook])[0]


def _check_stop(_module: nn.Module, _args: tuple) -> None:
    stopping.check()


def run_to_hooks(
    model: nn.Module, input_ids: Tensor, hooks: Sequence[str | HookPoint]
) -> list[Tensor]:
    """The activations at several hooks from one forward pass over `input_ids: [B, T]`:
    one `[B, T, d]` tensor per hook, in the order given.

    Runs the blocks up to the deepest hook and stops there: the later blocks, the final norm
    and the unembedding (most of the cost at early hooks) never run. Grad mode is the caller's:
    wrap in `torch.inference_mode()` for extraction. A stop request (sae_core.stopping) ends
    the pass before the next block: one pass takes seconds on a busy CPU.
    """
    points = [HookPoint.parse(h) for h in hooks]
    unique = list(dict.fromkeys(points))
    captured: dict[HookPoint, Tensor] = {}

    def capture(point: HookPoint) -> Callable[[Tensor], None]:
        def fn(activation: Tensor) -> None:
            captured[point] = activation
            # Hooks fire in forward order, so the last one to fire is the deepest.
            if len(captured) == len(unique):
                raise _StopForward

        return fn

    with ExitStack() as stack:
        for point in unique:
            stack.enter_context(hooked(model, point, capture(point)))
        for block in decoder_layers(model)[: max(p.layer for p in unique) + 1]:
            stack.callback(block.register_forward_pre_hook(_check_stop).remove)
        try:
            model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
    missing = [str(p) for p in unique if p not in captured]
    if missing:
        raise RuntimeError(f"hooks {', '.join(missing)} did not fire during the forward pass")
    return [captured[p] for p in points]


@contextmanager
def truncated(model: nn.Module, n_layers: int) -> Iterator[nn.Module]:
    """The model's base (embeddings, blocks, final norm; no unembedding) with only its first
    `n_layers` decoder blocks, for as long as the block lasts: a bare forward of the depth an
    extraction to layer `n_layers - 1` runs."""
    holder, attr, layers = layers_holder(model)
    setattr(holder, attr, nn.ModuleList(list(layers)[:n_layers]))
    try:
        yield model.base_model
    finally:
        setattr(holder, attr, layers)


def forward_with_replacement(
    model: nn.Module,
    input_ids: Tensor,
    hook: str | HookPoint,
    replace: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    """Logits `[B, T, V]` of a full forward over `input_ids: [B, T]` with the hook's
    activation `[B, T, d]` replaced by `replace(activation)` (None: the clean run).

    Cost: one full forward plus `replace`. Grad mode is the caller's (use
    `torch.inference_mode()` for evaluation, or the SAE's parameters build a graph).
    """
    if replace is None:
        return model(input_ids=input_ids, use_cache=False).logits
    with hooked(model, hook, replace):
        return model(input_ids=input_ids, use_cache=False).logits


class ModelFacts(NamedTuple):
    """What the pipeline needs to know of a model before loading its weights."""

    width: int
    """The hook's activation width (the model's hidden size)."""
    n_layers: int
    """Decoder blocks."""
    vocab_size: int
    """Token ids are in [0, vocab_size)."""
    positions: int | None = None
    """max_position_embeddings, when the config says."""


def inspect_model(path: str, hook: str) -> ModelFacts:
    """Read the model's config only (no weights) and check the hook exists in it."""
    hub_offline()
    from transformers import AutoConfig

    resolved = resolve_model_path(path)
    try:
        config = AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.path '{path}': cannot read a model config there ({type(err).__name__}); "
            "give a local Hugging Face model folder or a demo asset name and run `make setup`"
        ) from None
    check_hook(config, hook)
    positions = getattr(config.get_text_config(), "max_position_embeddings", None)
    return ModelFacts(
        width=config.hidden_size,
        n_layers=num_layers(config),
        vocab_size=config.vocab_size,
        positions=positions if isinstance(positions, int) else None,
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    path: str, dtype: str = "float32", device: str | torch.device = "auto"
) -> LoadedModel:
    """An HF causal LM and its tokenizer, in eval mode with gradients off.

    `path` is a local HF model folder, a `.gguf` file (dequantised by transformers), or a hub
    id (offline: it must already be in the HF cache).
    """
    hub_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype '{dtype}': expected one of {', '.join(_DTYPES)}")
    target = pick_device(device) if not isinstance(device, torch.device) else device
    path = os.path.expanduser(path)
    folder, extra = path, {}
    if path.endswith(".gguf"):
        folder, extra = os.path.dirname(path) or ".", {"gguf_file": os.path.basename(path)}
    looks_local = path.startswith(("/", ".")) or path.count("/") > 1
    if looks_local and not os.path.exists(path):
        raise ConfigError(
            f"model.path '{path}': no such file or folder; give an HF model folder or a demo asset name"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        # Safetensors or GGUF only: pickle weights (pytorch_model.bin) can run code when loaded.
        with transformers_bars_off():  # a stage's own bar reports its progress
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=_DTYPES[dtype], use_safetensors=None if extra else True, **extra
            )
    except Exception as err:  # noqa: BLE001 - any loader failure is a bad model.path
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"model.path '{path}': cannot load a causal LM ({reason[:200]}); "
            "give a local HF model folder, a demo asset name (run `make setup`) or a cached hub id"
        ) from None
    model.eval().requires_grad_(False)
    return LoadedModel(model.to(target), tokenizer, model.config)
