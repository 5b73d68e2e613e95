"""What the current build wants: shards of instructions and the fingerprint of every row
(docs/ARCHITECTURE.md, principle 1, decision 3).

A stage's fingerprint hashes the fingerprint of its input, its template version, model and sampling, so
the whole chain for an instruction is known before any call: a changed system-message template changes
the fingerprints of system messages, responses and pairs, and leaves trees and sets alone. All rows of one
instruction in one stage share the fingerprint; `set_index` tells them apart.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import NamedTuple

from facets.schemas import NUM_BUCKETS, Instruction, fingerprint
from facets.schemas.config import BuildConfig
from facets.schemas.stages import STAGE_NAMES, STAGES, Stage
from facets.tasks.templates import Template

# Bump when the deterministic choice of sets or pairs changes: it is part of their fingerprints.
SELECTION_VERSION = "sel1"
PAIR_INDEX = -1  # set_index of a pair row in the `expected` table

# One fingerprint per stage, by the stage's name: `fingerprints.responses`.
Fingerprints = NamedTuple("Fingerprints", [(name, str) for name in STAGE_NAMES])


@dataclass(frozen=True)
class StagePlan:
    """The parts of the config and templates that decide each stage's rows, in stage order: a stage that
    makes calls is decided by its template version, model and sampling; one that chooses without a call by
    the build settings it names (`Stage.chosen_by`) and the selection rule's version."""

    parts: tuple[tuple, ...]

    @classmethod
    def of(cls, config: BuildConfig, templates: dict[str, Template], sets: int | None = None) -> "StagePlan":
        """`sets`: preference sets per instruction, when not the config's (a bench item has one)."""
        settings = {"seed": config.seed, "sets_per_instruction": sets or config.sets_per_instruction}

        def part(stage: Stage) -> tuple:
            if stage.calls_llm:
                sampling = config.stages[stage.name].sampling.request_fields()
                return (templates[stage.template].version, config.model_of(stage.name), sampling,
                        *_changed(config, stage.prompt_settings))
            return (*(settings[name] for name in stage.chosen_by), SELECTION_VERSION)

        return cls(tuple(part(stage) for stage in STAGES))

    def fingerprints(self, instruction_id: str) -> Fingerprints:
        chain, previous = [], instruction_id
        for stage, part in zip(STAGES, self.parts):
            previous = fingerprint(stage.name, previous, *part)
            chain.append(previous)
        return Fingerprints(*chain)


def _changed(config: BuildConfig, names: tuple[str, ...]) -> tuple:
    """The prompt settings set away from their default: only these enter a fingerprint, so the rows of builds
    made before a setting existed keep theirs."""
    fields = type(config).model_fields
    return tuple(f"{name}={getattr(config, name)}" for name in names if getattr(config, name) != fields[name].default)


def seeded_rank(instruction_id: str, seed: int) -> int:
    """Draw order of the build: instructions are taken lowest rank first (the same rule as ingest)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{instruction_id}".encode(), digest_size=8).digest(), "big")


def buckets_per_shard(pool: int, shard_size: int) -> int:
    """A power of two, so shards stay aligned bucket ranges as the pool grows."""
    width = 1
    while width < NUM_BUCKETS and pool * width / NUM_BUCKETS < shard_size:
        width *= 2
    return width


def shard_ranges(instructions: list[Instruction], width: int) -> dict[tuple[int, int], list[Instruction]]:
    """Instructions grouped by the bucket range [lo, hi] they fall in."""
    shards: dict[tuple[int, int], list[Instruction]] = {}
    for instruction in instructions:
        lo = instruction.bucket - instruction.bucket % width
        shards.setdefault((lo, lo + width - 1), []).append(instruction)
    return dict(sorted(shards.items()))
