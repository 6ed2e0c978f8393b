"""SAELens and EleutherAI sparsify on-disk formats: export a saeflow TopK SAE (BatchTopK and
Matryoshka included), import either; transcoders and skip transcoders in sparsify's format both
ways (`sparsify_transcoder`).

SAELens (>= 6): a folder with `cfg.json` (architecture "topk", d_in, d_sae, k,
normalize_activations, apply_b_dec_to_input, metadata{model_name, hook_name, ...}) and
`sae_weights.safetensors` (W_enc [d, n], W_dec [n, d], b_enc [n], b_dec [d]). Its encoder
computes TopK then ReLU of (norm_in(x) - b_dec) W_enc + b_enc; the decoder z W_dec + b_dec,
then norm_out.

A BatchTopK SAE with its inference threshold (Matryoshka BatchTopK too) is written as SAELens
saves its own BatchTopK and MatryoshkaBatchTopK SAEs for inference: architecture "jumprelu"
(no k) and a `threshold` [n] tensor holding the one threshold for every latent; its encoder
keeps ReLU(pre) where pre > threshold, as saeflow's does. A Matryoshka SAE's cfg.json also
states its nesting as SAELens' training config names it, `matryoshka_widths` (the prefix
sizes; SAELens' inference classes ignore the key). sparsify has no threshold: such an SAE is
refused there rather than exported with other codes.

sparsify: a folder (one per hookpoint) with `cfg.json` (activation "topk", num_latents, k,
d_in, ...) and `sae.safetensors` (encoder.weight [n, d], encoder.bias [n], W_dec [n, d],
b_dec [d]). Its encoder is ReLU then TopK of (x - b_dec) encoder.weight^T + encoder.bias:
the same codes as TopK then ReLU. It has no input normalisation.

Normalisation, so that the exported SAE maps raw activations as saeflow does:
- global (x_norm = g x) is folded into the weights of both formats: W_enc * g, W_dec / g,
  b_dec = b_pre / g. Same latents, raw-space reconstruction, no runtime transform.
- per_token (centre each token, scale it to unit norm) is SAELens' "layer_norm" (centre,
  divide by the unbiased std + 1e-5, undo on the way out) with sqrt(d - 1) folded into the
  weights, because ||x - mean|| = sqrt(d - 1) std. Equal to saeflow's up to that 1e-5, a
  relative 1e-5 / std (1e-6 on SmolLM's residual stream). sparsify cannot express it: the
  weights are exported unfolded and cfg.json's "saeflow" entry states the transform exactly
  (`caller_transform`), which `import_sae` applies and a plain sparsify user must apply around
  encode/decode. No fold exists: each token is divided by its own norm, which no linear
  layer (nor sparsify's fixed biases) can express.
Both cfg.json files carry a top-level "saeflow" entry (normalisation, full SAE config, origin)
that the other libraries ignore and that makes the round trip exact.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_core.config import TRANSCODER_KINDS, SAEConfig
from sae_core.errors import ConfigError
from sae_core.sae import MatryoshkaSAE, SparseAutoencoder, TopKSAE, build_sae, load_sae_bytes
from sae_core.sae.normalize import EPS, InputNorm
from sae_core.sae.sparsify_transcoder import SKIP_TENSOR, from_sparsify, to_sparsify
from sae_core.sae.transcoder import TranscoderSAE

if TYPE_CHECKING:
    from sae_core.storage.lineage import Lineage

Format = Literal["saelens", "sparsify"]
FORMATS: tuple[Format, ...] = ("saelens", "sparsify")
CFG_FILE = "cfg.json"
WEIGHTS = {"saelens": "sae_weights.safetensors", "sparsify": "sae.safetensors"}
ORIGIN_FILE = "origin.json"  # written next to the weights of a registered model
SAELENS_LAYOUT_VERSION = "6.0.0"  # the SAELens cfg.json layout written (metadata nested)

# saeflow hook kind <-> TransformerLens hook name (SAELens' convention).
_TL_HOOKS = {
    "resid_pre": "hook_resid_pre",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
}
_TL_PATTERN = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")


class Origin(BaseModel):
    """What an SAE was trained on, as far as it is known."""

    model: str | None = None  # a hub id where known (`saeflow export` maps demo assets to theirs)
    hook: str | None = None  # saeflow naming, e.g. resid_post.15
    context_size: int | None = None
    skip_first_position: bool | None = None  # trained without position 0 of each context

    @classmethod
    def of(cls, lineage: Lineage) -> Origin:
        """The origin a `sae_core.storage.lineage.Lineage` records."""
        return cls(
            model=lineage.model,
            hook=lineage.hook,
            context_size=lineage.context_len,
            skip_first_position=lineage.skip_first_position,
        )


def transformer_lens_hook(hook: str | None) -> str | None:
    """`resid_post.15` -> `blocks.15.hook_resid_post` (None when there is no equivalent)."""
    kind, _, layer = (hook or "").partition(".")
    return f"blocks.{layer}.{_TL_HOOKS[kind]}" if kind in _TL_HOOKS and layer.isdigit() else None


def saeflow_hook(name: str | None) -> str | None:
    """The inverse of transformer_lens_hook; `layers.15` (sparsify's name) -> resid_post.15."""
    if name and (m := _TL_PATTERN.match(name)):
        kind = next((k for k, v in _TL_HOOKS.items() if v == m[2]), None)
        return f"{kind}.{m[1]}" if kind else None
    if name and (m := re.fullmatch(r"(?:model\.)?layers\.(\d+)", name)):
        return f"resid_post.{m[1]}"
    return None


# What a caller must do around a library's encode/decode when the library cannot normalise
# (sparsify with per_token): saeflow's per-token normalisation (sae_core.sae.normalize), exactly.
PER_TOKEN_TRANSFORM = {
    "before_encode": "x_in = (x - m) / s, where for each token x (its d values) m = mean(x) and "
    "s = max(||x - m||_2, eps)",
    "after_decode": "x_hat = decode(codes) * s + m, with the m and s of the same token",
    "eps": EPS,
    "without_it": "codes and reconstructions are wrong, silently (NMSE ~1.5 on SmolLM2)",
}
NO_TRANSFORM = "none: the normalisation is folded into the weights or done by the library"


def _saeflow_entry(sae: TopKSAE, origin: Origin, transform_needed: bool) -> dict[str, Any]:
    return {
        "normalization": sae.norm.to_json(),
        # True when the library cannot apply the normalisation itself: the caller must
        # normalise before encode and undo it after decode (sparsify with per_token).
        "caller_applies_normalization": transform_needed,
        "caller_transform": PER_TOKEN_TRANSFORM if transform_needed else NO_TRANSFORM,
        "config": sae.cfg.model_dump(mode="json"),
        "origin": origin.model_dump(),
    }


def inference_threshold(sae: TopKSAE) -> float | None:
    """The threshold `encode` keeps latents above (BatchTopK once trained), else None: the
    top k per token."""
    if not sae.cfg.batch_topk or torch.isnan(sae.threshold):
        return None
    return float(sae.threshold.clamp_min(0))


def _weights(sae: TopKSAE, scale_in: float) -> dict[str, torch.Tensor]:
    """Latent-major weights with x -> scale_in * x folded in: W_enc*s, W_dec/s, b_pre/s."""
    with torch.no_grad():
        return {
            "W_enc": (sae.W_enc * scale_in).float().contiguous(),
            "W_dec": (sae.W_dec / scale_in).float().contiguous(),
            "b_enc": sae.b_enc.float().contiguous(),
            "b_dec": (sae.b_pre / scale_in).float().contiguous(),
        }


def check_format(fmt: str) -> None:
    """Raise unless `fmt` is a format export writes (checked before any SAE is fetched)."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format '{fmt}': choose one of {', '.join(FORMATS)}")


def export_sae(
    sae: SparseAutoencoder, out: Path, fmt: Format, origin: Origin | None = None
) -> list[Path]:
    """Write the TopK SAE `sae` into folder `out` in format `fmt`; returns the files written."""
    check_format(fmt)
    if isinstance(sae, TranscoderSAE):
        return _export_transcoder(sae, out, fmt, origin or Origin())
    if not isinstance(sae, TopKSAE):
        raise ConfigError(
            f"export: SAELens and sparsify hold TopK SAEs only, this one is sae.kind="
            f"{sae.cfg.kind}; ship its saeflow .safetensors file (compact, no pickle) instead"
        )
    threshold = inference_threshold(sae)
    if threshold is not None and fmt == "sparsify":
        raise ConfigError(
            f"export: sparsify has no inference threshold for this BatchTopK SAE (sae.kind="
            f"{sae.cfg.kind}); export --format saelens (its JumpReLU layout) instead"
        )
    origin = origin or Origin()
    mode, d = sae.norm.mode, sae.d
    if mode == "global":
        scale_in = sae.norm.global_scale
    elif mode == "per_token" and fmt == "saelens":
        scale_in = 1.0 / math.sqrt(d - 1)  # layer_norm's input is sqrt(d-1) x saeflow's
    else:
        scale_in = 1.0
    w = _weights(sae, scale_in)
    entry = _saeflow_entry(sae, origin, mode == "per_token" and fmt == "sparsify")
    if fmt == "saelens":
        tensors = {
            "W_enc": w["W_enc"].T.contiguous(),
            "W_dec": w["W_dec"],
            "b_enc": w["b_enc"],
            "b_dec": w["b_dec"],
        }
        selection: dict[str, Any] = {"architecture": "topk", "k": sae.k}
        if threshold is not None:
            selection = {"architecture": "jumprelu"}
            tensors["threshold"] = torch.full((sae.n_latents,), threshold)
        if isinstance(sae, MatryoshkaSAE):
            selection["matryoshka_widths"] = list(sae.sizes)
        cfg = {
            "architecture": selection.pop("architecture"),
            "d_in": d,
            "d_sae": sae.n_latents,
            **selection,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "layer_norm" if mode == "per_token" else "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": origin.model,
                "hook_name": transformer_lens_hook(origin.hook),
                "hook_head_index": None,
                "context_size": origin.context_size,
                # Positions it was trained on, as SAELens' slice(*seqpos_slice): [1, None]
                # when position 0 (the attention sink) was left out.
                "seqpos_slice": [1, None] if origin.skip_first_position else [None],
                "prepend_bos": False,
                "sae_lens_version": SAELENS_LAYOUT_VERSION,
                "sae_lens_training_version": None,
            },
            "saeflow": entry,
        }
    else:
        tensors = {
            "encoder.weight": w["W_enc"],
            "encoder.bias": w["b_enc"],
            "W_dec": w["W_dec"],
            "b_dec": w["b_dec"],
        }
        cfg = {
            "activation": "topk",
            "expansion_factor": max(1, sae.n_latents // d),
            "normalize_decoder": mode != "global",  # folding scales the decoder rows by 1/g
            "num_latents": sae.n_latents,
            "k": sae.k,
            "multi_topk": sae.cfg.multi_topk,
            "skip_connection": False,
            "transcode": False,
            "d_in": d,
            "saeflow": entry,
        }
    return _write_folder(out, fmt, cfg, tensors)


def _write_folder(
    out: Path, fmt: Format, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    weights = out / WEIGHTS[fmt]
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=2))
    save_file(tensors, str(weights))
    # safetensors writes owner-only (0600) files; the weights get cfg.json's mode (the
    # umask's, 0644 by default) so whoever may read the config may read the weights.
    weights.chmod((out / CFG_FILE).stat().st_mode & 0o777)
    return [out / CFG_FILE, weights]


def _export_transcoder(tc: TranscoderSAE, out: Path, fmt: Format, origin: Origin) -> list[Path]:
    """A transcoder in sparsify's format (`sae_core.sae.sparsify_transcoder`); SAELens only
    loads transcoders, in a layout of its own, so it is not written."""
    if fmt != "sparsify":
        raise ConfigError(
            f"export: sae.kind={tc.cfg.kind} is exported in sparsify's format only "
            "(its transcode / skip_connection options); use --format sparsify"
        )
    if tc.cfg.batch_topk:
        raise ConfigError(
            "export: sparsify has no BatchTopK inference threshold; ship this transcoder's "
            "saeflow .safetensors file instead"
        )
    cfg, tensors = to_sparsify(tc)
    entry = _saeflow_entry(tc, origin, False)
    entry["out_normalization"] = tc.out_norm.to_json()
    return _write_folder(out, fmt, cfg | {"saeflow": entry}, tensors)


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


def load_source(source: str) -> tuple[SparseAutoencoder, Origin]:
    """A saeflow SAE to export: a `.safetensors` file it wrote, or an SAE dataset on a store
    (`STORE/sae/FINGERPRINT`, local or s3://), whose lineage names the model and hook."""
    from sae_core.sae import load_sae
    from sae_core.storage.lineage import sae_lineage
    from sae_core.storage.refs import committed_dataset

    if source.endswith(".safetensors"):
        if not Path(source).is_file():
            raise ConfigError(f"export source {source}: no such file")
        return load_sae_bytes(Path(source).read_bytes()), Origin()
    ref = committed_dataset(source, "sae")
    if ref is None:
        raise ConfigError(
            f"export source {source}: not a saeflow .safetensors file or a committed "
            "STORE/sae/FINGERPRINT dataset; or give models:/NAME@ALIAS"
        )
    return load_sae(ref), Origin.of(sae_lineage(ref))
