"""Which model each stage table holds. Parquet schemas derive from these models only."""
from __future__ import annotations

from pydantic import BaseModel

from facets.schemas import (
    Failure,
    GoldResponse,
    Instruction,
    Pair,
    PreferenceSet,
    PreferenceTree,
    SystemMessage,
)

STAGE_MODELS: dict[str, type[BaseModel]] = {
    "instructions": Instruction,
    "preference_trees": PreferenceTree,
    "preference_sets": PreferenceSet,
    "system_messages": SystemMessage,
    "responses": GoldResponse,
    "pairs": Pair,
}
FAILURES = "failures"
TABLE_MODELS: dict[str, type[BaseModel]] = {**STAGE_MODELS, FAILURES: Failure}


def model_of(table: str) -> type[BaseModel]:
    try:
        return TABLE_MODELS[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; known: {sorted(TABLE_MODELS)}") from None
