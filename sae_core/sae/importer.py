"""Reading an SAELens or sparsify folder (the formats: `sae_core.sae.formats`) into a saeflow SAE
and its origin: another library's TopK SAE, saeflow's own exports exactly (their "saeflow" entry:
normalisation, config, origin; a BatchTopK SAE's JumpReLU layout), a sparsify transcoder. What
cannot be read as written is refused in one line naming the field and the fix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_core.config import TRANSCODER_KINDS, SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae import TopKSAE, build_sae
from sae_core.sae.formats import CFG_FILE, FORMATS, WEIGHTS, Format, Origin, saeflow_hook
from sae_core.sae.normalize import InputNorm
from sae_core.sae.sparsify_transcoder import SKIP_TENSOR, from_sparsify


def detect_format(folder: Path) -> Format:
    """Which format a folder holds, by its file names."""
    for fmt in FORMATS:
        if (folder / CFG_FILE).is_file() and (folder / WEIGHTS[fmt]).is_file():
            return fmt
    raise ConfigError(
        f"{folder}: no SAELens ({CFG_FILE} + {WEIGHTS['saelens']}) or sparsify "
        f"({CFG_FILE} + {WEIGHTS['sparsify']}) SAE here; point at the folder holding them"
    )


def _require(ok: bool, folder: Path, field: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{folder / CFG_FILE}: {field}: {fix}")


class _Stored(NamedTuple):
    """An SAE as a file holds it: latent-major weights with `scale_in` folded in."""

    W_enc: torch.Tensor  # [n, d]
    W_dec: torch.Tensor  # [n, d]
    b_enc: torch.Tensor
    b_dec: torch.Tensor
    k: Any
    threshold: float | None  # a JumpReLU file's one threshold (saeflow's BatchTopK export)
    norm: InputNorm
    scale_in: float
    origin: Origin


def _read_saelens(folder: Path, cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> _Stored:
    arch = cfg.get("architecture") or cfg.get("activation_fn", cfg.get("activation_fn_str"))
    _require(
        arch in ("topk", "jumprelu"),
        folder,
        "architecture",
        f"'{arch}' is not TopK; saeflow imports TopK SAEs and its own BatchTopK exports only",
    )
    threshold, k = None, cfg.get("k")
    if arch == "jumprelu":
        threshold, k = _shared_threshold(folder, cfg, t)
    elif k is None:
        k = _section(folder, cfg, "activation_fn_kwargs").get("k")
    norm_mode = cfg.get("normalize_activations") or "none"
    _require(
        norm_mode in ("none", "layer_norm"),
        folder,
        "normalize_activations",
        f"'{norm_mode}' is not supported; re-export with none or layer_norm",
    )
    _require(
        not cfg.get("rescale_acts_by_decoder_norm"),
        folder,
        "rescale_acts_by_decoder_norm",
        "not supported; fold the decoder norms into the encoder first",
    )
    W_enc, b_enc, b_dec = t["W_enc"].T, t["b_enc"], t["b_dec"]
    if not cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc + W_enc @ b_dec  # its encoder never subtracts b_dec; saeflow's does
    meta = _section(folder, cfg, "metadata") or cfg  # SAELens < 6 kept these at the top level
    per_token = norm_mode == "layer_norm"
    return _Stored(
        W_enc=W_enc,
        W_dec=t["W_dec"],
        b_enc=b_enc,
        b_dec=b_dec,
        k=k,
        threshold=threshold,
        norm=InputNorm("per_token" if per_token else "none"),
        scale_in=1.0 / math.sqrt(W_enc.shape[1] - 1) if per_token else 1.0,
        origin=Origin(
            model=meta.get("model_name"),
            hook=saeflow_hook(meta.get("hook_name")),
            context_size=meta.get("context_size"),
        ),
    )


def _read_sparsify(folder: Path, cfg: dict[str, Any], t: dict[str, torch.Tensor]) -> _Stored:
    _require(
        cfg.get("activation", "topk") == "topk",
        folder,
        "activation",
        "saeflow imports TopK SAEs only",
    )
    _require(
        not cfg.get("skip_connection") and SKIP_TENSOR not in t,
        folder,
        "skip_connection",
        "a skip connection without transcode is not supported",
    )
    return _Stored(
        W_enc=t["encoder.weight"],
        W_dec=t["W_dec"],
        b_enc=t["encoder.bias"],
        b_dec=t["b_dec"],
        k=cfg.get("k"),
        threshold=None,
        norm=InputNorm("none"),
        scale_in=1.0,
        origin=Origin(hook=saeflow_hook(folder.name)),  # sparsify names folders by hookpoint
    )


# Per format: the tensors a file must hold, by their axes (d: input width, n: latents; the
# encoder first), and the cfg.json fields that declare d and n.
_SHAPES = {
    "saelens": {"W_enc": "dn", "W_dec": "nd", "b_enc": "n", "b_dec": "d"},
    "sparsify": {"encoder.weight": "nd", "encoder.bias": "n", "W_dec": "nd", "b_dec": "d"},
}
_WIDTH_FIELDS = {
    "saelens": {"d": "d_in", "n": "d_sae"},
    "sparsify": {"d": "d_in", "n": "num_latents"},
}


def _shared_threshold(
    folder: Path, cfg: dict[str, Any], t: dict[str, torch.Tensor]
) -> tuple[float, Any]:
    """(threshold, k) of a JumpReLU file that saeflow's BatchTopK export wrote: one threshold
    for every latent, k from its saeflow entry (JumpReLU itself has none)."""
    _require(
        "threshold" in t,
        folder,
        "threshold",
        "a JumpReLU SAE needs its threshold tensor in the weights file",
    )
    threshold = t["threshold"]
    _require(
        threshold.shape == t["b_enc"].shape,
        folder,
        "threshold",
        f"has shape {list(threshold.shape)}, expected one value per latent {list(t['b_enc'].shape)}",
    )
    _require(
        threshold.numel() > 0 and bool((threshold == threshold.reshape(-1)[0]).all()),
        folder,
        "threshold",
        "latents with thresholds of their own are JumpReLU proper; saeflow imports only its "
        "BatchTopK exports, one threshold for all latents",
    )
    config = _section(folder, cfg, "saeflow").get("config")
    _require(
        isinstance(config, dict) and bool(config.get("batch_topk")),
        folder,
        "saeflow.config",
        "missing or not BatchTopK; saeflow imports a JumpReLU SAE only from its own export",
    )
    return float(threshold.reshape(-1)[0]), config.get("k")


def _section(folder: Path, cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key) or {}
    _require(
        isinstance(value, dict), folder, key, f"expected an object, found {type(value).__name__}"
    )
    return value


def _read_cfg(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / CFG_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{folder / CFG_FILE}: not JSON ({err}); fix or re-export it") from None
    if not isinstance(cfg, dict):
        raise ConfigError(
            f"{folder / CFG_FILE}: holds a JSON {type(cfg).__name__}, expected an object of "
            "settings (architecture, d_in, k, ...)"
        )
    return cfg


def _read_tensors(weights: Path, fmt: Format) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The file's tensors, checked: each one the format needs, shapes that agree, all finite;
    and the widths {d, n} they hold."""
    try:
        tensors = {k: v.float() for k, v in load_file(str(weights)).items()}
    except SafetensorError as err:  # a pickle or a damaged file: refused, never unpickled
        raise ConfigError(f"{weights}: not a readable safetensors file ({err})") from None
    shapes = _SHAPES[fmt]
    missing = [name for name in shapes if name not in tensors]
    if missing:
        raise ConfigError(
            f"{weights}: no tensor {missing[0]} (it holds {', '.join(sorted(tensors)) or 'none'}); "
            f"a {fmt} TopK SAE holds {', '.join(shapes)}"
        )
    encoder, axes = next(iter(shapes.items()))
    widths = dict(zip(axes, tensors[encoder].shape, strict=False))
    for name, axes in shapes.items():
        found, expected = list(tensors[name].shape), [widths.get(axis, -1) for axis in axes]
        if found != expected:
            raise ConfigError(
                f"{weights}: tensor {name} has shape {found}, expected {expected} "
                f"({'x'.join(axes)}, d={widths.get('d')} dimensions, n={widths.get('n')} latents)"
            )
        if not torch.isfinite(tensors[name]).all():
            raise ConfigError(
                f"{weights}: tensor {name} holds NaN or infinite values; re-export a trained SAE"
            )
    return tensors, widths


def _check_cfg(
    folder: Path, fmt: Format, cfg: dict[str, Any], widths: dict[str, int], k: Any
) -> None:
    """cfg.json's declared widths match the weights, and its k is a valid k."""
    for axis, field in _WIDTH_FIELDS[fmt].items():
        declared = cfg.get(field)
        _require(
            declared is None or declared == widths[axis],
            folder,
            field,
            f"says {declared!r} but the weights hold {widths[axis]}; fix cfg.json or the weights",
        )
    _require(k is not None, folder, "k", "missing; a TopK SAE needs k")
    _require(
        isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= widths["n"],
        folder,
        "k",
        f"{k!r} is not a valid k; a TopK SAE needs an integer in [1, {widths['n']}] (its latents)",
    )


def import_sae(folder: Path) -> tuple[TopKSAE, Origin]:
    """Read an SAELens or sparsify TopK SAE folder into a saeflow TopKSAE and its origin (the
    kind its saeflow entry names, e.g. a MatryoshkaSAE, with its BatchTopK threshold; a sparsify
    transcoder: a TranscoderSAE, a subclass).
    Refused in one line: a cfg.json that is not an object, widths it declares that the
    weights do not have, an invalid k, missing tensors, NaN or infinite weights."""
    fmt = detect_format(folder)
    cfg = _read_cfg(folder)
    tensors, widths = _read_tensors(folder / WEIGHTS[fmt], fmt)
    if fmt == "sparsify" and cfg.get("transcode"):
        _check_cfg(folder, fmt, cfg, widths, cfg.get("k"))
        entry = cfg.get("saeflow")
        try:
            tc = from_sparsify(cfg, tensors, entry)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{folder / CFG_FILE}: saeflow: unreadable ({type(err).__name__}: {err}); "
                "remove the entry to import it as another tool's transcoder"
            ) from None
        origin = Origin.model_validate(entry["origin"]) if entry else Origin()
        return tc, origin
    stored = (_read_saelens if fmt == "saelens" else _read_sparsify)(folder, cfg, tensors)
    _check_cfg(folder, fmt, cfg, widths, stored.k)
    n, d = stored.W_enc.shape
    norm, scale_in, origin = stored.norm, stored.scale_in, stored.origin
    sae_cfg = SAEConfig(n_latents=n, k=stored.k, normalize=norm.mode)
    if entry := cfg.get("saeflow"):  # written by saeflow: its normalisation and config, exactly
        try:
            norm = InputNorm.from_json(entry["normalization"])
            origin = Origin.model_validate(entry["origin"])
            sae_cfg = SAEConfig.model_validate(entry["config"])
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"{folder / CFG_FILE}: saeflow: unreadable ({type(err).__name__}: {err}); "
                "remove the entry to import it as another tool's SAE"
            ) from None
        _require(
            sae_cfg.n_latents == n and sae_cfg.k == stored.k,
            folder,
            "saeflow.config",
            f"n_latents={sae_cfg.n_latents}, k={sae_cfg.k} disagree with the weights' {n} "
            f"latents and k={stored.k}",
        )
        if norm.mode == "global":
            scale_in = norm.global_scale
    _require(
        sae_cfg.kind not in ("expander", *TRANSCODER_KINDS),
        folder,
        "saeflow.config",
        f"sae.kind={sae_cfg.kind} has no SAELens or sparsify SAE layout; remove the entry",
    )
    sae = build_sae(d, sae_cfg, norm)
    state = {
        "W_enc": stored.W_enc / scale_in,
        "W_dec": stored.W_dec * scale_in,
        "b_enc": stored.b_enc,
        "b_pre": stored.b_dec * scale_in,
    }
    if sae_cfg.batch_topk:  # NaN: no threshold yet, the top k per token (as exported)
        value = float("nan") if stored.threshold is None else stored.threshold
        state["threshold"] = torch.tensor(value)
    sae.load_state_dict(state)
    return cast(TopKSAE, sae), origin
