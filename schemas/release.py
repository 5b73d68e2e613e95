"""Row layouts of the published kaist-ai/Multifaceted-Collection* and Multifaceted-Bench datasets.

Column names, order and nesting match the published data exactly; `preference_set` is a list of structs
and `chosen`/`rejected` of the pairwise sets are chats, never JSON strings.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from facets.schemas.records import DIMENSIONS, Preference, _check_one_per_dimension


class ReleaseRow(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SFTRow(ReleaseRow):
    """`Multifaceted-Collection` and `-small`."""

    main_source: str
    original_source: str
    preference_set: list[Preference] = Field(min_length=4, max_length=4)
    system: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    output: str = Field(min_length=1)

    _one_per_dimension = field_validator("preference_set")(classmethod(lambda cls, v: _check_one_per_dimension(v)))


class ChatMessage(ReleaseRow):
    content: str
    role: Literal["user", "assistant"]


def _user_then_assistant(chat: list[ChatMessage]) -> list[ChatMessage]:
    if [m.role for m in chat] != ["user", "assistant"]:
        raise ValueError("a pair side is a 2-message chat: user then assistant")
    return chat


class PreferencePairRow(ReleaseRow):
    """`Multifaceted-Collection-DPO` and `-ORPO`."""

    main_source: str
    original_source: str
    system: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    chosen: list[ChatMessage]
    rejected: list[ChatMessage]

    _chats = field_validator("chosen", "rejected")(classmethod(lambda cls, v: _user_then_assistant(v)))


class RMRow(ReleaseRow):
    """`Multifaceted-Collection-RM`: input = system + "\\n" + prompt."""

    input: str = Field(min_length=1)
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)


class ScoreDescriptions(ReleaseRow):
    one: str = Field(alias="1")
    two: str = Field(alias="2")
    three: str = Field(alias="3")
    four: str = Field(alias="4")
    five: str = Field(alias="5")


class Rubric(ReleaseRow):
    criteria: str = Field(min_length=1)
    score_descriptions: ScoreDescriptions


class BenchRow(ReleaseRow):
    """`Multifaceted-Bench`: `source` is the finest label the benchmark gives (docs/ARCHITECTURE.md, decision 11)."""

    source: str
    preference_set: list[Preference] = Field(min_length=4, max_length=4)
    system: str = Field(min_length=1)
    prompt: str = Field(min_length=1)
    reference_answer: str = Field(min_length=1)
    rubrics: list[Rubric] = Field(min_length=len(DIMENSIONS), max_length=len(DIMENSIONS))

    _one_per_dimension = field_validator("preference_set")(classmethod(lambda cls, v: _check_one_per_dimension(v)))
