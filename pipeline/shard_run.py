"""One shard through every stage: one Prefect task run per (stage, shard), never one per LLM call
(docs/ARCHITECTURE.md, principle 4). Inside a task one event loop drives hundreds of calls through the
gateway. A crashed (stage, shard) is retried by Prefect and resumes from the stored rows and the journal;
conditions that would fail every call (`RunAborted`: bad key, spend cap, most calls failing) are not retried.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from prefect import task
from prefect.cache_policies import NO_CACHE

from facets.llm.errors import RunAborted
from facets.pipeline.context import BuildContext, all_or_none
from facets.pipeline.shard import Shard
from facets.schemas.stages import STAGE_NAMES
from facets.tasks.stages import RUNNERS


def retry_unless_aborted(task_, task_run, state) -> bool:
    """Prefect retries a crashed (stage, shard), never a run-wide stop (bad key, spend cap, most calls failing)
    nor a storage error (a full disk, a read-only or forbidden data dir): that fails again the same way, and
    the retry would pay again for the calls whose replies could not be journaled."""
    from facets.storage.errors import is_storage_error

    return not isinstance(state.data, RunAborted) and not is_storage_error(state.data)



@task(name="stage", cache_policy=NO_CACHE, task_run_name="{stage}-{shard.title}", retry_delay_seconds=2)
async def run_stage(stage: str, ctx: BuildContext, shard: Shard) -> dict[str, int]:
    await RUNNERS[stage](ctx, shard)
    return shard.counts[stage].as_dict()



async def run_stages(ctx: BuildContext, shard: Shard,
                     tree_slot: Callable[[], AbstractAsyncContextManager] = contextlib.nullcontext,
                     after_stage: Callable[[str], Awaitable[None]] | None = None) -> None:
    """One shard through every stage, one Prefect task run per stage, trees inside `tree_slot`. The stages
    run at once, each on the instructions the one before has finished so far (pipeline/feed.py); a stage's
    task run starts when its first instruction arrives."""
    stage_task = run_stage.with_options(retries=ctx.config.shard_retries, retry_condition_fn=retry_unless_aborted)
    shard.open_feeds(STAGE_NAMES)

    async def one(stage: str) -> None:
        await shard.source(stage).started()
        async with tree_slot() if stage == "preference_trees" else contextlib.nullcontext():
            await stage_task(stage, ctx, shard)
        shard.stage_done(stage)
        if after_stage is not None:
            await after_stage(stage)

    await all_or_none([asyncio.create_task(one(stage)) for stage in STAGE_NAMES])

