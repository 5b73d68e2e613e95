"""What a build hands a shard run on another worker, and what that run hands back (scale-out)."""
from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, Field


class ShardSpec(BaseModel):
    """One shard of a build: its bucket range and the instruction ids drawn into it."""

    build: str = Field(description="id of the build-collection run; its shard summaries go under builds/<build>/")
    lo: int = Field(ge=0)
    hi: int = Field(ge=0)
    ids: list[str] = Field(min_length=1)
    tree_limit: str | None = Field(None, description="Prefect global concurrency limit the tree stage runs under")
    journal_tag: str | None = Field(None, description="the build attempt's journal writers (pipeline/dispatch.py)")
    stored: dict[str, list[str]] = Field(
        default_factory=dict,
        description="stage -> names of its files there before the build whose bucket range overlaps the shard's")

    @property
    def name(self) -> str:
        return f"b{self.lo:04d}-{self.hi:04d}"

    @property
    def key(self) -> str:
        """Unique within a build: replacements drawn later for the same bucket range share its name."""
        digest = hashlib.blake2b("\n".join(sorted(self.ids)).encode(), digest_size=4).hexdigest()
        return f"{self.name}-{digest}"


class ShardSummary(BaseModel):
    """A shard run's outcome, written to builds/<build>/<shard key>.json whether it finished or stopped."""

    name: str
    run: str = Field("", description="id of the flow run that wrote it")
    accepted: list[str] = Field(default_factory=list, description="instructions with every row, a pair included")
    drawn: int = Field(0, ge=0, description="instructions drawn into the shard, accepted or not")
    counts: dict[str, dict[str, int]] = Field(default_factory=dict, description="stage -> reused, made, failed")
    failures: dict[str, int] = Field(default_factory=dict, description="stage:reason -> rows")
    usage: dict[str, dict[str, Any]] = Field(default_factory=dict, description="LLM stage -> calls, tokens, cost")
    worker: str = Field("", description="host and process that ran it")
    seconds: float = 0.0
    error: str | None = Field(None, description="why the run stopped, when it did not finish")
    aborted: bool = Field(False, description="stopped by a run-wide condition (bad key, spend cap, failures)")


class ShardProgress(BaseModel):
    """What a shard run reports each time one of its stages ends, at builds/<build>/progress/<run>.<stage>.json:
    the build draws replacements for the instructions a stage dropped then, not when the run ends."""

    run: str = Field(description="id of the flow run that wrote it")
    stage: str
    alive: int = Field(ge=0, description="the shard's instructions that came through this stage")
