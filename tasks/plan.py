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
from facets.tasks.templates import Template

STAGES = ("preference_trees", "preference_sets", "system_messages", "responses", "pairs")
# Bump when the deterministic choice of sets or pairs changes: it is part of their fingerprints.
SELECTION_VERSION = "sel1"
PAIR_INDEX = -1  # set_index of a pair row in the `expected` table


class Fingerprints(NamedTuple):
    preference_trees: str
    preference_sets: str
    system_messages: str
    responses: str
    pairs: str


@dataclass(frozen=True)
class StagePlan:
    """The parts of the config and templates that decide each stage's rows."""

    seed: int
    sets: int
    tree: tuple
    system: tuple
    response: tuple

    @classmethod
    def of(cls, config: BuildConfig, templates: dict[str, Template]) -> "StagePlan":
        def part(stage: str, template: str) -> tuple:
            settings = config.stages[stage]
            return (templates[template].version, config.model_of(stage), settings.sampling.request_fields())

        return cls(config.seed, config.sets_per_instruction, part("preference_trees", "preference_tree"),
                   part("system_messages", "system_message"), part("responses", "gold_response"))

    def fingerprints(self, instruction_id: str) -> Fingerprints:
        tree = fingerprint("preference_trees", instruction_id, *self.tree)
        sets = fingerprint("preference_sets", tree, self.seed, self.sets, SELECTION_VERSION)
        system = fingerprint("system_messages", sets, *self.system)
        response = fingerprint("responses", system, *self.response)
        return Fingerprints(tree, sets, system, response, fingerprint("pairs", response, self.seed, SELECTION_VERSION))


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
