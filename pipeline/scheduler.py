"""Which shards a build runs, and where: instructions drawn in seeded order until N are accepted (decision 8),
each shard run by an executor, in this process or as a flow run on a work pool.

Replacements are drawn as soon as a stage drops instructions, while the other shards run, so the build
never ends with a second round for the failed few. Few shards make trees at once (`max_tree_shards`): tree
calls are token-heavy and the later stages request-heavy, and a pipeline of shards in different stages keeps
both the endpoint's RPM and its TPM busy. Small shards (the replacements) take neither a shard nor a tree
slot and always run in this process: they start at once. A shard whose instructions are all `complete` runs
no stage at all: a no-op rebuild reads no stage rows.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from prefect import get_run_logger

from facets.pipeline.context import BuildContext
from facets.pipeline.dispatch import ShardDispatch
from facets.pipeline.report import Progress
from facets.pipeline.selection import Pool
from facets.pipeline.shard import Shard, overlapping
from facets.pipeline.shard_run import run_stages
from facets.schemas.shards import ShardSpec, ShardSummary
from facets.schemas.stages import STAGE_NAMES
from facets.tasks.plan import buckets_per_shard, shard_ranges

StageEnded = Callable[[str], Awaitable[None]]


class ShardExecutor(Protocol):
    """Runs one shard through every stage and returns its summary (the same type wherever it ran);
    `stage_ended` is awaited as each stage of the shard ends (or, for a run elsewhere, once per stage when it
    is back), `reported` when a run elsewhere reports a stage's end with the instructions still alive."""

    async def run(self, shard: Shard, stage_ended: StageEnded, reported: Callable[[int], None]) -> ShardSummary: ...


class InProcess:
    """The shard's stages as task runs of this flow, on this event loop; its trees wait for a tree slot."""

    def __init__(self, ctx: BuildContext, tree_slots: asyncio.Semaphore | None = None):
        self.ctx, self.tree_slots = ctx, tree_slots

    async def run(self, shard: Shard, stage_ended: StageEnded, reported: Callable[[int], None]) -> ShardSummary:
        slot = contextlib.nullcontext if self.tree_slots is None else (lambda: self.tree_slots)
        await run_stages(self.ctx, shard, slot, after_stage=stage_ended)
        shard.finish()
        return shard.summary()


class OnWorkPool:
    """The shard as a `build-shard` flow run on the shard deployment's pool (pipeline/dispatch.py): its trees
    under a Prefect global concurrency limit of `max_tree_shards` slots that all the workers share."""

    def __init__(self, ctx: BuildContext, dispatch: ShardDispatch):
        self.ctx, self.dispatch = ctx, dispatch

    async def run(self, shard: Shard, stage_ended: StageEnded, reported: Callable[[int], None]) -> ShardSummary:
        dispatch = self.dispatch
        spec = ShardSpec(build=dispatch.build, lo=shard.lo, hi=shard.hi, ids=list(shard.instructions),
                         tree_limit=dispatch.tree_limit, journal_tag=dispatch.scope.tag,
                         stored=overlapping(self.ctx.stored, shard.lo, shard.hi))
        summary = await dispatch.run(spec, on_progress=lambda report: reported(report.alive))
        shard.apply(summary)  # before the stages are reported: replacements are drawn from what it accepted
        for stage in STAGE_NAMES:
            await stage_ended(stage)
        return summary


async def build_shards(ctx: BuildContext, pool: Pool, wanted: int, progress: Progress,
                       complete: frozenset[str] = frozenset(), executor: ShardExecutor | None = None) -> list[Shard]:
    """Runs shards until `wanted` instructions are accepted or the pool runs out; `executor` runs the full-size
    shards (default: in this process)."""
    config = ctx.config
    shards: list[Shard] = []
    running: set[asyncio.Task] = set()
    limit = asyncio.Semaphore(config.max_concurrent_shards)
    here, small_here = InProcess(ctx, asyncio.Semaphore(config.max_tree_shards)), InProcess(ctx)
    executor = executor or here

    async def one(shard: Shard) -> None:
        if shard.instructions.keys() <= complete:
            shard.reuse_complete(STAGE_NAMES)
            for stage in STAGE_NAMES:
                await progress.advance(stage, shard)
            return
        runner = small_here if config.is_small(len(shard.instructions)) else executor
        async with contextlib.nullcontext() if runner is small_here else limit:
            summary = await runner.run(shard, lambda stage: advance(stage, shard), lambda alive: reported(shard, alive))
        shard.apply(summary)  # one summary type from either executor, taken the same way

    async def advance(stage: str, shard: Shard) -> None:
        await progress.advance(stage, shard)
        top_up()

    def reported(shard: Shard, alive: int) -> None:  # a stage of a shard run on a worker ended
        shard.reported(alive)
        top_up()

    draws = 0

    def top_up() -> None:
        nonlocal draws
        short = wanted - sum(s.expected() for s in shards)
        if short <= 0 or not pool.remaining:
            return
        instructions = pool.draw(short)
        width = buckets_per_shard(len(instructions), config.shard_size)
        new = [Shard(lo, hi, group, {i.id: ctx.plan.fingerprints(i.id) for i in group}, config.sets_per_instruction,
                     draw=draws) for (lo, hi), group in shard_ranges(instructions, width).items()]
        draws += 1
        progress.add(len(new) * len(STAGE_NAMES), len(instructions))
        shards.extend(new)
        running.update(asyncio.create_task(one(shard)) for shard in new)

    top_up()
    await _until_all_done(running)
    if let_go := keep_wanted(shards, wanted, pool.order):
        get_run_logger().warning("%d accepted instructions beyond the %d wanted were let go (a crashed shard run's "
                                 "rerun accepted more than its first run reported); their rows stay stored",
                                 let_go, wanted)
    return shards


async def _until_all_done(running: set[asyncio.Task]) -> None:
    """Waits for the shards, new ones included; a shard that failed for good stops the build and the rest."""
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
            running.difference_update(done)
            for task in done:
                task.result()
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


def keep_wanted(shards: list[Shard], wanted: int, order: list[str]) -> int:
    """Exactly `wanted` accepted, those drawn first (`order`: the pool's draw order), as a build that drew
    no more than it needed would have: a shard run that crashed and went again can accept more than its
    first run reported, after replacements were drawn for the difference. The rows let go stay stored
    (paid for), and a later, larger build reuses them. Returns how many were let go."""
    surplus = sum(len(shard.accepted()) for shard in shards) - wanted
    if surplus <= 0:
        return 0
    rank = {iid: i for i, iid in enumerate(order)}
    kept = set(sorted((iid for shard in shards for iid in shard.accepted()), key=rank.__getitem__)[:wanted])
    for shard in shards:
        shard.keep_only(kept)
    return surplus

