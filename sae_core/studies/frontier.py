"""The storage-fidelity frontier of Expander SAEs (Mendoza-Smith 2026): which SAEs to train and
the table they give.

On one activation set, per training seed: the dense TopK SAE of `config.sae` (the reference),
an expander SAE for each degree of `config.frontier.degrees` (same n and k), and for each
degree below the model width a parameter-matched dense SAE with as many learned decoder values
(n' = degree * n / m latents, k' = min(k, n')). Each is scored by CE loss recovered; an
expander's `retained` is its CE recovered over the dense reference's (same seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from sae_core.config import TRANSCODER_KINDS, PipelineConfig, SAEConfig, TrainConfig
from sae_core.errors import ConfigError
from sae_core.studies.points import EvaluatedSAE, saebench_columns

Family = Literal["dense", "expander", "matched"]
FAMILIES: tuple[Family, ...] = ("dense", "expander", "matched")


class FrontierPlanPoint(NamedTuple):
    """An SAE the frontier trains."""

    family: Family
    degree: int  # decoder non-zeros per latent (the model width m for dense SAEs)
    seed: int
    sae: SAEConfig
    train: TrainConfig

    @property
    def label(self) -> str:
        return frontier_label(self.family, self.degree, self.sae.n_latents, self.seed)


def frontier_label(family: Family, degree: int, n: int, seed: int) -> str:
    detail = {"dense": f"n={n}", "expander": f"d={degree}", "matched": f"d={degree} n={n}"}
    return f"{family} {detail[family]} seed={seed}"


def matched_latents(degree: int, n: int, width: int) -> int:
    """Latents of the dense SAE whose m x n' decoder holds as many values as the expander's
    n x degree one (the paper's parameter matching): round(degree n / m), at least 1."""
    return max(1, round(degree * n / width))


def frontier_plan(config: PipelineConfig, width: int) -> list[FrontierPlanPoint]:
    """The frontier's SAEs, seed-major: dense, then expanders by degree, then matched dense.

    width: the hook's width m. Fails before any work on a transcoder, a degree outside 1..m
    or an invalid SAE config.
    """
    if config.sae.kind in TRANSCODER_KINDS:
        # Expanders are SAEs of one hook: no expander transcoder to compare with the dense one.
        raise ConfigError(
            f"saeflow frontier compares dense TopK SAEs of model.hook with expander SAEs; "
            f"sae.kind={config.sae.kind} has no expander form. Set sae.kind=topk and unset "
            "model.hook_out, or train transcoders with saeflow sweep"
        )
    fr = config.frontier
    bad = [d for d in fr.degrees if not 1 <= d <= width]
    if bad:
        raise ConfigError(
            f"frontier.degrees={fr.degrees}: {bad} outside 1..{width} (the width of "
            f"{config.model.hook}); choose degrees between 1 and {width}"
        )
    base = config.sae.model_dump() | {"kind": "topk"}
    for name in ("degree", "encoder", "mask_seed", "resample_dead"):
        base.pop(name, None)  # the expanders' settings come from config.frontier
    n, k = config.sae.n_latents, config.sae.k
    dense = SAEConfig.model_validate(base)
    points: list[FrontierPlanPoint] = []
    for seed in fr.seeds:
        train = config.train.model_copy(update={"seed": seed})
        points.append(FrontierPlanPoint("dense", width, seed, dense, train))
        for degree in fr.degrees:
            expander = SAEConfig.model_validate(
                base
                | {
                    "kind": "expander",
                    "degree": degree,
                    "encoder": fr.encoder,
                    "mask_seed": seed,
                    "resample_dead": fr.resample_dead,
                }
            )
            points.append(FrontierPlanPoint("expander", degree, seed, expander, train))
        if fr.matched:
            for degree in fr.degrees:
                n_matched = matched_latents(degree, n, width)
                if degree == width or n_matched >= n:
                    continue  # the dense reference itself
                matched = SAEConfig.model_validate(
                    base | {"n_latents": n_matched, "k": min(k, n_matched)}
                )
                points.append(FrontierPlanPoint("matched", degree, seed, matched, train))
    return points


class FrontierPoint(EvaluatedSAE):
    """A trained and evaluated frontier SAE."""

    family: Family
    """dense (the reference), expander, or matched (a dense SAE with the expander's values)."""
    degree: int
    """Decoder non-zeros per latent (the model width m for dense SAEs)."""

    @property
    def label(self) -> str:
        return frontier_label(self.family, self.degree, self.n, self.seed)


@dataclass(frozen=True)
class FrontierRow:
    """One frontier SAE with its storage figures (sae_core.sae.storage_report)."""

    family: Family
    degree: int
    n: int
    k: int
    seed: int
    metrics: dict[str, float]
    decoder_values: int
    artifact_bytes: int


TABLE_COLUMNS = ("family", "degree", "n", "k", "seed", "decoder_values", "compression",
                 "artifact_bytes", "bytes_ratio", "ce_loss_recovered", "retained",
                 "dead_fraction", "nmse")  # fmt: skip


def frontier_table(rows: list[FrontierRow]) -> list[dict[str, Any]]:
    """The paper's table: per SAE, compression = dense decoder values / its decoder values (m/d
    for an expander), bytes_ratio = dense artifact bytes / its artifact bytes, and retained =
    CE recovered / the dense reference's CE recovered (same seed); then SAEBench's figures
    (studies.points.SAEBENCH_COLUMNS) when the SAEs have them. Rows in `rows` order."""
    reference = {r.seed: r for r in rows if r.family == "dense"}
    missing = sorted({r.seed for r in rows} - set(reference))
    if missing:
        raise ValueError(f"frontier rows lack the dense reference for seeds {missing}")
    bench = saebench_columns(r.metrics for r in rows)
    table = []
    for r in rows:
        ref = reference[r.seed]
        ce = r.metrics.get("ce_loss_recovered", float("nan"))
        table.append(
            {
                "family": r.family,
                "degree": r.degree,
                "n": r.n,
                "k": r.k,
                "seed": r.seed,
                "decoder_values": r.decoder_values,
                "compression": ref.decoder_values / r.decoder_values,
                "artifact_bytes": r.artifact_bytes,
                "bytes_ratio": ref.artifact_bytes / r.artifact_bytes,
                "ce_loss_recovered": ce,
                "retained": ce / ref.metrics.get("ce_loss_recovered", float("nan")),
                "dead_fraction": r.metrics.get("dead_fraction", float("nan")),
                "nmse": r.metrics.get("nmse", float("nan")),
            }
            | {c: r.metrics.get(c, float("nan")) for c in bench}
        )
    return table


def frontier_summary(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table averaged over seeds per (family, degree): mean compression, mean and standard
    deviation (over seeds; 0 for one seed) of retained, mean CE recovered and dead fraction, and
    the mean of each SAEBench figure the table has.
    Ordered dense, expanders by degree, matched by degree."""
    import statistics

    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in table:
        groups.setdefault((row["family"], row["degree"]), []).append(row)
    order = sorted(groups, key=lambda key: (FAMILIES.index(key[0]), key[1]))  # type: ignore[arg-type]
    summary = []
    for family, degree in order:
        rows = groups[(family, degree)]
        retained = [r["retained"] for r in rows]
        summary.append(
            {
                "family": family,
                "degree": degree,
                "n": rows[0]["n"],
                "seeds": len(rows),
                "compression": statistics.fmean(r["compression"] for r in rows),
                "bytes_ratio": statistics.fmean(r["bytes_ratio"] for r in rows),
                "ce_loss_recovered": statistics.fmean(r["ce_loss_recovered"] for r in rows),
                "retained": statistics.fmean(retained),
                "retained_std": statistics.stdev(retained) if len(rows) > 1 else 0.0,
                "dead_fraction": statistics.fmean(r["dead_fraction"] for r in rows),
            }
            | {c: statistics.fmean(r[c] for r in rows) for c in saebench_columns(rows)}
        )
    return summary
