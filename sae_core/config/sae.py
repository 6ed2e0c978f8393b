"""The `sae` section: the SAE's kind and shape, and the checks its fields need together."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sae_core.config.common import Seed, Strict
from sae_core.errors import ConfigError


class SAEConfig(Strict):
    kind: Literal["topk", "expander", "matryoshka", "transcoder", "skip_transcoder"] = Field(
        "topk",
        description="topk: dense decoder (Gao et al.); expander: each decoder direction has "
        "sae.degree non-zeros on a random expander graph (Mendoza-Smith, 2026); matryoshka: "
        "topk's weights trained so that every prefix in sae.matryoshka_prefixes reconstructs "
        "alone (Bussmann et al., 2025), BatchTopK unless sae.batch_topk=false; transcoder: "
        "TopK latents of model.hook reconstruct model.hook_out; skip_transcoder: plus a learned "
        "linear map from input to output (arXiv 2501.18823).",
    )
    n_latents: int = Field(4608, ge=1)
    k: int = Field(32, ge=1)
    k_aux: int | None = Field(None, ge=1, description="Dead latents used by AuxK; default d/2.")
    aux_alpha: float = Field(1 / 32, ge=0)
    dead_window_tokens: int = Field(
        10_000_000, ge=1, description="A latent is dead after this many tokens without firing."
    )
    multi_topk: bool = False
    batch_topk: bool = Field(
        False,
        description="BatchTopK: keep the top k*B pre-activations of each training batch (k per "
        "token on average); inference keeps those above a threshold estimated in training.",
    )
    normalize: Literal["per_token", "global", "none"] = "per_token"
    b_pre_init: Literal["geometric_median", "mean"] = "geometric_median"
    degree: int | None = Field(
        None,
        ge=1,
        description="Expander: non-zeros per decoder direction, 1 <= degree <= model width; "
        "compression = width / degree.",
    )
    encoder: Literal["untied", "tied"] = Field(
        "untied",
        description="Expander: untied = a dense encoder (Gao's recipe); tied = the masked "
        "decoder transposed at every step (the paper's choice).",
    )
    mask_seed: Seed = Field(0, description="Expander: seed of the decoder's random graph.")
    resample_dead: bool = Field(
        False,
        description="Expander: at every sae.dead_window_tokens boundary, re-initialise the dead "
        "latents inside their mask support (the paper's choice).",
    )
    matryoshka_prefixes: list[float] | None = Field(
        None,
        min_length=1,
        description="Matryoshka: the nested dictionaries whose reconstruction losses are summed, "
        "as latent counts ending with sae.n_latents (e.g. [288, 1152, 4608]) or, when every "
        "value is <= 1, as fractions of it ending with 1 (e.g. [0.0625, 0.25, 1]); None: "
        "[1/16, 1/4, 1].",
    )

    @model_validator(mode="before")
    @classmethod
    def _matryoshka_is_batch_topk(cls, data: Any) -> Any:
        # Matryoshka BatchTopK is the kind's recipe; sae.batch_topk=false asks for per-token TopK.
        if isinstance(data, dict) and data.get("kind") == "matryoshka":
            return {"batch_topk": True, **data}
        return data

    @model_validator(mode="after")
    def _k_within_n(self) -> SAEConfig:
        if self.k > self.n_latents:
            raise ValueError(
                f"sae.k={self.k} exceeds sae.n_latents={self.n_latents}; choose k <= n_latents"
            )
        if self.k_aux is not None and self.k_aux > self.n_latents:
            raise ValueError(
                f"sae.k_aux={self.k_aux} exceeds sae.n_latents={self.n_latents} (AuxK picks "
                "among the dead latents); choose sae.k_aux <= sae.n_latents"
            )
        if self.multi_topk and 4 * self.k > self.n_latents:
            raise ValueError("sae.multi_topk needs 4*k <= n_latents; lower sae.k or disable it")
        if self.multi_topk and self.batch_topk:
            raise ValueError("sae.batch_topk and sae.multi_topk cannot be combined; disable one")
        return self

    @model_validator(mode="after")
    def _expander_fields(self) -> SAEConfig:
        if self.kind == "expander" and self.degree is None:
            raise ValueError(
                "sae.kind=expander needs sae.degree (non-zeros per decoder direction, "
                "1 <= degree <= model width); set e.g. sae.degree=8"
            )
        if self.kind != "expander":
            defaults = {"degree": None, "encoder": "untied", "mask_seed": 0, "resample_dead": False}
            stray = [name for name, value in defaults.items() if getattr(self, name) != value]
            if stray:
                raise ValueError(
                    f"sae.kind={self.kind} does not use "
                    f"{', '.join(f'sae.{name}' for name in stray)}; "
                    "remove it or set sae.kind=expander"
                )
        return self

    @model_validator(mode="after")
    def _matryoshka_fields(self) -> SAEConfig:
        if self.kind != "matryoshka":
            if self.matryoshka_prefixes is not None:
                raise ValueError(
                    f"sae.kind={self.kind} does not use sae.matryoshka_prefixes; "
                    "remove it or set sae.kind=matryoshka"
                )
            return self
        if self.multi_topk:
            raise ValueError(
                "sae.kind=matryoshka and sae.multi_topk cannot be combined; disable multi_topk"
            )
        self.prefix_sizes()  # raises on prefixes that do not nest
        return self

    def prefix_sizes(self) -> tuple[int, ...]:
        """Matryoshka: the nested dictionaries' sizes in latents, increasing, the last n_latents
        (sae.matryoshka_prefixes resolved; fractions round to the nearest count). ValueError
        naming the field when they do not nest."""
        given = self.matryoshka_prefixes or [1 / 16, 1 / 4, 1.0]
        field = f"sae.matryoshka_prefixes={given}" + (
            "" if self.matryoshka_prefixes else " (default)"
        )
        n = self.n_latents
        if min(given) <= 0:
            raise ValueError(f"{field}: give positive sizes (latent counts, or fractions of n)")
        if max(given) <= 1:  # fractions of n
            sizes = [round(f * n) for f in given]
            fix = f"give increasing fractions ending with 1 that stay distinct at n_latents={n}"
        else:
            if any(v != int(v) for v in given):
                raise ValueError(f"{field}: latent counts must be integers (or all values <= 1)")
            sizes = [int(v) for v in given]
            fix = f"give increasing latent counts ending with sae.n_latents={n}"
        if sizes[0] < 1 or any(a >= b for a, b in zip(sizes, sizes[1:], strict=False)):
            raise ValueError(
                f"{field} resolves to {sizes} latents: each must be >= 1 and larger than the "
                f"one before; {fix}"
            )
        if sizes[-1] != n:
            raise ValueError(
                f"{field}: the last prefix must be the whole dictionary ({n} latents); {fix}"
            )
        return tuple(sizes)

    @model_validator(mode="after")
    def _transcoder_norm(self) -> SAEConfig:
        if self.kind in TRANSCODER_KINDS and self.normalize == "per_token":
            raise ValueError(
                f"sae.kind={self.kind} cannot use sae.normalize=per_token (a token's output scale "
                "is not known from its input); set sae.normalize=global or none"
            )
        return self


TRANSCODER_KINDS = ("transcoder", "skip_transcoder")


def check_expander_graph(n_latents: int, width: int, degree: int) -> None:
    """ConfigError naming sae.degree unless an expander decoder exists for this model width:
    1 <= degree <= width, and degree * n_latents >= width (every coordinate used)."""
    if not 1 <= degree <= width:
        raise ConfigError(
            f"sae.degree={degree} exceeds the model width {width}; "
            f"choose 1 <= sae.degree <= {width}"
        )
    if degree * n_latents < width:
        raise ConfigError(
            f"sae.degree={degree} x sae.n_latents={n_latents} non-zeros cannot cover all "
            f"{width} coordinates of the model width; raise sae.degree to at least "
            f"{-(-width // n_latents)} or sae.n_latents"
        )
