"""The `sweep` and `frontier` sections: the grids the research flows train; and the SAE kinds
`saeflow study kinds` compares, as the overrides that make each from a preset."""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

from pydantic import Field, model_validator

from sae_core.config.common import Seed, Strict, check_distinct
from sae_core.errors import ConfigError


class SweepConfig(Strict):
    """The grid `saeflow sweep` trains: every (n_latents, k, seed) with k <= n_latents."""

    n_latents: list[int] = Field([1152, 2304, 4608], min_length=1)
    k: list[int] = Field([16, 32, 64], min_length=1)
    seeds: list[Seed] = Field([0], min_length=1, description="Training seeds (train.seed).")
    tokens_exponent: float | None = Field(
        None,
        ge=0,
        le=2,
        description="Train each n on train.tokens x (n / smallest n)^exponent tokens, as tokens to "
        "convergence grow with n (Gao et al.: about 0.6); None: every point trains as train says.",
    )

    @model_validator(mode="after")
    def _valid_grid(self) -> SweepConfig:
        for name, low in (("n_latents", 1), ("k", 1), ("seeds", 0)):
            check_distinct(f"sweep.{name}", getattr(self, name), low)
        if max(self.k) > min(self.n_latents):
            raise ValueError(
                f"k={self.k} has k > n for n_latents={self.n_latents}; "
                "keep every k <= the smallest n"
            )
        return self


class FrontierConfig(Strict):
    """What `saeflow frontier` trains beside the dense reference (the sae section): an expander
    per degree and, per degree, a dense SAE with as many decoder values."""

    degrees: list[int] = Field(
        [1, 2, 4, 8, 16, 32, 64, 144, 576],
        min_length=1,
        description="Expander degrees (decoder non-zeros per latent), each in 1..model width.",
    )
    encoder: Literal["untied", "tied"] = Field(
        "tied", description="The expanders' encoder; tied (the paper's) keeps the artifact compact."
    )
    resample_dead: bool = Field(False, description="Resample dead expander latents in-support.")
    matched: bool = Field(True, description="Train the parameter-matched dense SAEs too.")
    seeds: list[Seed] = Field([0], min_length=1, description="Training and mask seeds.")
    full_eval: bool = Field(
        False,
        description="Also run probes and ablation sparsity (the frontier needs CE recovered only).",
    )

    @model_validator(mode="after")
    def _distinct(self) -> FrontierConfig:
        for name, low in (("degrees", 1), ("seeds", 0)):
            check_distinct(f"frontier.{name}", getattr(self, name), low)
        return self


class StudyKind(NamedTuple):
    """One SAE kind of `saeflow study kinds`: the fields it sets on top of a preset."""

    sae: dict[str, Any]
    """The sae section's fields it sets."""
    model: dict[str, Any]
    """The model section's fields it sets; `{layer}` in a value is the layer of the preset's
    model.hook (a transcoder of that layer's MLP)."""


STUDY_KINDS: dict[str, StudyKind] = {
    "topk": StudyKind({"kind": "topk", "batch_topk": False}, {}),
    "batch_topk": StudyKind({"kind": "topk", "batch_topk": True}, {}),
    "matryoshka": StudyKind({"kind": "matryoshka", "batch_topk": True}, {}),
    # One pass extracts both hooks (model.compile extracts one); transcoders refuse per-token
    # normalisation (a token's output scale is not known from its input).
    "skip_transcoder": StudyKind(
        {"kind": "skip_transcoder", "normalize": "global"},
        {"hook": "mlp_in.{layer}", "hook_out": "mlp_out.{layer}", "compile": False},
    ),
}


def study_kind_overrides(name: str, hook: str) -> list[str]:
    """The `--set` overrides that make kind `name` (of STUDY_KINDS) from a configuration whose
    model.hook is `hook`; ConfigError naming --kinds and the kinds for an unknown name."""
    if name not in STUDY_KINDS:
        raise ConfigError(f"--kinds: unknown kind {name!r}; choose from {', '.join(STUDY_KINDS)}")
    kind, layer = STUDY_KINDS[name], hook.rsplit(".", 1)[1]
    fields = [("sae", kind.sae), ("model", kind.model)]
    return [
        f"{section}.{key}={_yaml(value).format(layer=layer)}"
        for section, values in fields
        for key, value in values.items()
    ]


def _yaml(value: Any) -> str:
    """A value as `--set` reads it (YAML): booleans lower-case."""
    return str(value).lower() if isinstance(value, bool) else str(value)
