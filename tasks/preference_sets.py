"""Stage 2: sets of one preference per dimension, chosen from the tree without an LLM call.

Each dimension's subdimension branches are visited in a seeded order, set k taking branch k, so with the
three or more branches a tree guarantees, the sets of an instruction differ in every dimension. With more
sets than branches the order wraps and a different preference of the branch is taken.
"""
from __future__ import annotations

import random

from facets.schemas import Failure, Preference, PreferenceSet, PreferenceTree
from facets.pipeline.context import BuildContext, Key
from facets.pipeline.shard import Shard, write_failures

STAGE = "preference_sets"


def choose_sets(tree: PreferenceTree, count: int, seed: int) -> list[list[Preference]]:
    sets: list[list[Preference]] = [[] for _ in range(count)]
    for branch in tree.dimensions:
        rng = random.Random(f"{seed}:{tree.instruction_id}:{branch.dimension}")
        order = rng.sample(range(len(branch.subdimensions)), len(branch.subdimensions))
        starts = [rng.randrange(len(b.preferences)) for b in branch.subdimensions]
        for k in range(count):
            b = order[k % len(order)]
            sub = branch.subdimensions[b]
            leaf = sub.preferences[(starts[b] + k // len(order)) % len(sub.preferences)]
            sets[k].append(Preference(dimension=branch.dimension, subdimension=sub.subdimension,
                                      preference=leaf.preference, description=leaf.description))
    return sets


async def run(ctx: BuildContext, shard: Shard) -> None:
    failures: list[Failure] = []

    async def make(todo: list[Key]) -> dict[Key, PreferenceSet]:
        rows, wanted = {}, set(todo)
        for iid in dict.fromkeys(iid for iid, _ in todo):
            chosen = choose_sets(shard.rows["preference_trees"][(iid, 0)], shard.sets, ctx.config.seed)
            if len({tuple(p.preference for p in s) for s in chosen}) < len(chosen):
                failures.append(Failure(stage=STAGE, key=iid, reason="too_few_distinct_sets",
                                        detail=f"the tree cannot give {shard.sets} different sets"))
                continue
            for k, preferences in enumerate(chosen):
                if (iid, k) in wanted:
                    rows[(iid, k)] = PreferenceSet(instruction_id=iid, fingerprint=shard.plans[iid].preference_sets,
                                                   set_index=k, preferences=preferences)
        return rows

    await ctx.fill(STAGE, shard, make)
    write_failures(ctx.store, shard, failures)
