"""The promote flow: move the `champion` alias to the `challenger` when the gate passes."""

from __future__ import annotations

from prefect import flow

from sae_core.evaluation.promotion import PromotionPolicy, PromotionResult
from tasks.promote import promote_model


@flow(name="saeflow-promote", log_prints=True)
def promote(
    model_name: str = "saeflow-demo",
    policy: PromotionPolicy = PromotionPolicy(),  # frozen: safe as a shared default
    dry_run: bool = False,
) -> PromotionResult:
    result = promote_model(model_name, policy, dry_run)
    print(
        f"{model_name}: champion {result.champion_before} -> {result.champion_after} "
        f"({result.decision.reason}{', dry run' if dry_run else ''})"
    )
    return result
