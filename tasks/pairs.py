"""Stage 5: chosen = the gold response for set k, rejected = that for another set j != k (seeded, no LLM).

k is also the set of the `small` release (docs/ARCHITECTURE.md, data flow).
"""
from __future__ import annotations

import random

from facets.schemas import Pair
from facets.pipeline.context import BuildContext, Key
from facets.pipeline.shard import Shard

STAGE = "pairs"


def choose_pair(instruction_id: str, sets: int, seed: int) -> tuple[int, int]:
    rng = random.Random(f"{seed}:{instruction_id}:pair")
    chosen = rng.randrange(sets)
    rejected = rng.choice([j for j in range(sets) if j != chosen])
    return chosen, rejected


async def run(ctx: BuildContext, shard: Shard) -> None:
    async def make(todo: list[Key]) -> dict[Key, Pair]:
        rows = {}
        for iid, _ in todo:
            chosen, rejected = choose_pair(iid, shard.sets, ctx.config.seed)
            rows[(iid, 0)] = Pair(instruction_id=iid, fingerprint=shard.plans[iid].pairs,
                                  chosen_index=chosen, rejected_index=rejected)
        return rows

    await ctx.fill(STAGE, shard, make)
