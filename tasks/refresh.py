"""Which stages of a run recompute although their outputs are committed (`saeflow run
--refresh STAGE`): the stages named, and every stage that reads an output of a recomputed one.

Plain Python, no Prefect: `flows/pipeline.py` asks `wants` before each stage and reports a
recomputed stage's output with `recomputed`; `tasks.caching.run_stage` does the recomputing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sae_core.errors import ConfigError

EVERY_STAGE = "all"


def checked_stages(named: Iterable[str], stages: Iterable[str]) -> frozenset[str]:
    """`named` (stage names, or `all`) when each is one of `stages`; a ConfigError otherwise."""
    named, known = frozenset(named), tuple(stages)
    unknown = sorted(named - {*known, EVERY_STAGE})
    if unknown:
        raise ConfigError(
            f"--refresh {unknown[0]}: no such stage; choose from {', '.join(known)} or "
            f"{EVERY_STAGE}"
        )
    return frozenset(known) if EVERY_STAGE in named else named


@dataclass
class Refresh:
    """The stages named to recompute, and the outputs recomputed so far in this run."""

    named: frozenset[str] = frozenset()
    outputs: list[Any] = field(default_factory=list)

    def wants(self, stage: str, inputs: dict[str, Any]) -> bool:
        """Whether `stage`, called with `inputs`, recomputes: it is named, or it reads an
        output a recomputed stage returned (the same address may now hold new bytes)."""
        return stage in self.named or any(
            value == output for value in inputs.values() for output in self.outputs
        )

    def recomputed(self, output: Any) -> None:
        self.outputs.append(output)
