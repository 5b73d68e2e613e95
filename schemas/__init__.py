"""Pydantic models for every record that crosses a stage or a file boundary; Arrow schemas derive from them."""
from facets.schemas.arrow import arrow_schema, from_table, to_table
from facets.schemas.ids import NUM_BUCKETS, bucket_of, fingerprint, instruction_id, normalise_text
from facets.schemas.records import (
    DIMENSIONS,
    DimensionBranch,
    Failure,
    GoldResponse,
    Instruction,
    Pair,
    Preference,
    PreferenceLeaf,
    PreferenceSet,
    PreferenceTree,
    PreferenceTreeBody,
    SubdimensionBranch,
    SystemMessage,
)
from facets.schemas.release import BenchRow, ChatMessage, PreferencePairRow, RMRow, Rubric, ScoreDescriptions, SFTRow

__all__ = [
    "DIMENSIONS", "NUM_BUCKETS", "BenchRow", "ChatMessage", "DimensionBranch", "Failure", "GoldResponse",
    "Instruction", "Pair", "Preference", "PreferenceLeaf", "PreferencePairRow", "PreferenceSet", "PreferenceTree",
    "PreferenceTreeBody", "RMRow", "Rubric", "SFTRow", "ScoreDescriptions", "SubdimensionBranch", "SystemMessage",
    "arrow_schema", "bucket_of", "fingerprint", "from_table", "instruction_id", "normalise_text", "to_table",
]
