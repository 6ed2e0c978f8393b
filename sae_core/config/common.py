"""What every section of the configuration shares: a strict, frozen pydantic base, the seed type
and the check of a grid's values."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# A seed fits 32 bits: the trainer and loader mix it as seed * 1_000_003 + step into torch's
# 64-bit generator seed, which a larger one would overflow (an OverflowError deep in training).
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class Strict(BaseModel):
    # NaN and inf pass `gt`/`ge` bounds (inf > 0) and would train a NaN SAE: refuse them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_distinct(field: str, values: list[int], low: int) -> None:
    """A grid's values: distinct, none below `low` (ValueError naming the field)."""
    if len(set(values)) != len(values) or min(values) < low:
        raise ValueError(f"{field}={values}: give distinct integers >= {low}")
