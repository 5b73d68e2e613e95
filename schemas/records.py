"""Records that cross a stage boundary: instructions, preference trees and sets, messages, responses."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from facets.schemas.ids import NUM_BUCKETS, bucket_of, instruction_id, normalise_text

Dimension = Literal["style", "background_knowledge", "informativeness", "harmlessness"]
DIMENSIONS: tuple[Dimension, ...] = ("style", "background_knowledge", "informativeness", "harmlessness")
MIN_SUBDIMENSIONS = 3

NonEmpty = Field(min_length=1)


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Instruction(Record):
    """One single-turn instruction from a source; `id` is derived from the normalised text."""

    id: str
    bucket: int = Field(ge=0, lt=NUM_BUCKETS)
    text: str = NonEmpty
    main_source: str = NonEmpty
    original_source: str
    metadata: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_text(cls, text: str, main_source: str, original_source: str = "", **metadata: str) -> "Instruction":
        iid = instruction_id(text)
        return cls(
            id=iid,
            bucket=bucket_of(iid),
            text=text.strip(),
            main_source=main_source,
            original_source=original_source,
            metadata=metadata,
        )

    @model_validator(mode="after")
    def _id_matches_text(self) -> "Instruction":
        if self.id != instruction_id(self.text):
            raise ValueError(f"id {self.id} is not the id of the text ({instruction_id(self.text)})")
        if self.bucket != bucket_of(self.id):
            raise ValueError(f"bucket {self.bucket} is not the bucket of {self.id}")
        return self

    @property
    def normalised(self) -> str:
        return normalise_text(self.text)


class Preference(Record):
    """One preference; field order is the published `preference_set` item order."""

    dimension: Dimension
    subdimension: str = NonEmpty
    preference: str = NonEmpty
    description: str = NonEmpty


class PreferenceLeaf(Record):
    preference: str = NonEmpty
    description: str = NonEmpty


class SubdimensionBranch(Record):
    subdimension: str = NonEmpty
    preferences: list[PreferenceLeaf] = Field(min_length=1)


class DimensionBranch(Record):
    dimension: Dimension
    subdimensions: list[SubdimensionBranch] = Field(min_length=MIN_SUBDIMENSIONS)

    @field_validator("subdimensions")
    @classmethod
    def _distinct(cls, branches: list[SubdimensionBranch]) -> list[SubdimensionBranch]:
        names = [normalise_text(b.subdimension).lower() for b in branches]
        if len(set(names)) != len(names):
            raise ValueError(f"subdimensions repeat: {names}")
        return branches


class PreferenceTreeBody(Record):
    """What the LLM returns for one instruction: the four dimensions, each with its branches."""

    dimensions: list[DimensionBranch] = Field(min_length=4, max_length=4)

    @field_validator("dimensions")
    @classmethod
    def _each_dimension_once(cls, branches: list[DimensionBranch]) -> list[DimensionBranch]:
        seen = sorted(b.dimension for b in branches)
        if seen != sorted(DIMENSIONS):
            raise ValueError(f"need each of {list(DIMENSIONS)} exactly once, got {seen}")
        return sorted(branches, key=lambda b: DIMENSIONS.index(b.dimension))


class StageRecord(Record):
    """A stage output: keyed by instruction, carrying the fingerprint of what produced it."""

    instruction_id: str = NonEmpty
    fingerprint: str = NonEmpty
    created_at: datetime = Field(default_factory=_utcnow)


class PreferenceTree(StageRecord, PreferenceTreeBody):
    model: str


def _check_one_per_dimension(preferences: list[Preference]) -> list[Preference]:
    dims = [p.dimension for p in preferences]
    if sorted(dims) != sorted(DIMENSIONS):
        raise ValueError(f"need exactly one preference per dimension {list(DIMENSIONS)}, got {dims}")
    return sorted(preferences, key=lambda p: DIMENSIONS.index(p.dimension))


class PreferenceSet(StageRecord):
    set_index: int = Field(ge=0)
    preferences: list[Preference] = Field(min_length=4, max_length=4)

    _one_per_dimension = field_validator("preferences")(classmethod(lambda cls, v: _check_one_per_dimension(v)))


class SystemMessage(StageRecord):
    set_index: int = Field(ge=0)
    text: str = NonEmpty
    model: str
    prompt_version: str


class GoldResponse(StageRecord):
    set_index: int = Field(ge=0)
    text: str = NonEmpty
    model: str
    prompt_version: str


class Pair(StageRecord):
    """chosen = the gold response for set `chosen_index`, rejected = that of another set of one instruction."""

    chosen_index: int = Field(ge=0)
    rejected_index: int = Field(ge=0)

    @model_validator(mode="after")
    def _different_sets(self) -> "Pair":
        if self.chosen_index == self.rejected_index:
            raise ValueError("chosen and rejected must come from different preference sets")
        return self


RAW_OUTPUT_MAX_BYTES = 64 * 1024


def clip_text(text: str, max_bytes: int) -> str:
    """`text` when its UTF-8 fits `max_bytes`; else its head, cut on a character boundary, and a marker
    saying how many characters were left out (the whole is within `max_bytes`)."""
    if len(text) * 4 <= max_bytes:  # no UTF-8 character is longer than 4 bytes
        return text
    head = text[:max_bytes].encode("utf-8", "surrogatepass")
    if len(head) <= max_bytes and len(text) <= max_bytes:
        return text
    marker = "\n[... {:,} more characters cut ...]"
    room = max_bytes - len(marker.format(len(text)).encode())
    kept = head[:room].decode("utf-8", "ignore")
    return kept + marker.format(len(text) - len(kept))


class Failure(Record):
    """A row that could not be produced, kept with its reason and the last raw output: byte for byte up to
    RAW_OUTPUT_MAX_BYTES, then its head and a marker (a runaway reply must not fill the failures table)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    stage: str = NonEmpty
    key: str = NonEmpty
    reason: str = NonEmpty
    raw_output: str = ""
    detail: str = ""
    source: str = ""
    row: int = -1
    created_at: datetime = Field(default_factory=_utcnow)

    @field_validator("raw_output")
    @classmethod
    def _bounded(cls, value: str) -> str:
        return clip_text(value, RAW_OUTPUT_MAX_BYTES)
