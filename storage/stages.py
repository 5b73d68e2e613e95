"""Which model each table holds. Parquet schemas derive from these models only."""
from __future__ import annotations

from pydantic import BaseModel

from facets.schemas import Failure, Instruction
from facets.schemas.stages import STAGES

STAGE_MODELS: dict[str, type[BaseModel]] = {"instructions": Instruction, **{stage.name: stage.row for stage in STAGES}}
FAILURES = "failures"
TABLE_MODELS: dict[str, type[BaseModel]] = {**STAGE_MODELS, FAILURES: Failure}


def model_of(table: str) -> type[BaseModel]:
    try:
        return TABLE_MODELS[table]
    except KeyError:
        raise KeyError(f"unknown table {table!r}; known: {sorted(TABLE_MODELS)}") from None
