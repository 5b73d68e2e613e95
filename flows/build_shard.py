"""The `build-shard` flow: every stage of one shard, as a flow run that a worker of the pool takes.

`build-collection` with `shard_deployment` starts one run of this flow per shard (pipeline/dispatch.py).
A run reads its instructions from the data dir, reuses the stored rows and journaled calls of its shard,
writes its rows, reports after each stage how many instructions came through (builds/<build>/progress/,
so the build draws replacements at once), and leaves a summary at builds/<build>/<shard key>.json for the
build to read, whether it finished or stopped. Started again after a crash, on any worker, it resumes
from the same rows and journal.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time

from prefect import flow, get_run_logger, runtime

from facets.pipeline.open_context import open_context
from facets.pipeline.shard_run import run_stages
from facets.pipeline.dispatch import JournalScope, progress_parts, summary_parts
from facets.llm.errors import RunAborted
from facets.schemas.config import BuildConfig
from facets.schemas.shards import ShardProgress, ShardSpec, ShardSummary
from facets.storage import Store
from facets.schemas.stages import STAGE_NAMES
from facets.pipeline.selection import load_instructions
from facets.pipeline.shard import Shard


TREE_LEASE_S = 60  # a dead worker's tree slot is free again after this long


def tree_slot(shard: ShardSpec):
    """The build's cross-worker tree semaphore (a Prefect global concurrency limit), when it has one."""
    if shard.tree_limit is None:
        return contextlib.nullcontext
    from prefect.concurrency.asyncio import concurrency

    return lambda: concurrency(shard.tree_limit, occupy=1, lease_duration=TREE_LEASE_S)


def stored_files(store: Store, shard: ShardSpec) -> dict[str, list[str]]:
    """Where this shard's stored rows can be: the files the build found before it started, and those
    written under this shard's name (an earlier run of it that crashed), not the other shards' files
    of this build: they hold other instructions, and the small ones span every bucket range."""
    own = f"{shard.name}-"
    found = {}
    for stage in STAGE_NAMES:
        before = [f"{store.table_dir(stage)}/{name}" for name in shard.stored.get(stage, [])]
        mine = [f for f in store.files(stage) if f.rsplit("/", 1)[-1].startswith(own)]
        found[stage] = list(dict.fromkeys(before + mine))
    return found


def reporter(store: Store, shard: ShardSpec, work: Shard):
    """After each stage: how many of the shard's instructions came through, for the build to draw
    replacements for the rest at once (pipeline/dispatch.py, `ProgressWatcher`)."""
    run_id = str(runtime.flow_run.id)

    async def report(stage: str) -> None:
        progress = ShardProgress(run=run_id, stage=stage, alive=work.expected())
        parts = progress_parts(shard.build, run_id, stage)
        await asyncio.to_thread(store.write_text, progress.model_dump_json(), *parts)
    return report


@flow(name="build-shard", log_prints=True, persist_result=False)
async def build_shard(config: BuildConfig, shard: ShardSpec) -> dict:
    """Trees -> sets -> system messages -> responses -> pairs for one shard of a build-collection run."""
    started = time.monotonic()
    store = Store(config.data_dir)
    # the build checked the endpoint once; a shard run does not ask it again
    scope = JournalScope(shard.journal_tag) if shard.journal_tag else None
    journal = scope.journal(config.data_dir, shard.lo, shard.hi) if scope else None
    ctx = await open_context(config, store, preflight=False, stored=stored_files(store, shard), journal=journal)
    work: Shard | None = None
    outcome: dict = {}
    try:
        instructions = load_instructions(store, shard.ids, (shard.lo, shard.hi))
        missing = set(shard.ids) - {i.id for i in instructions}
        if missing:
            raise ValueError(f"{len(missing)} instructions of shard {shard.name} are not in {config.data_dir}: "
                             f"the build and its workers must share one data dir ({sorted(missing)[:3]} ...)")
        work = Shard(shard.lo, shard.hi, instructions, {i.id: ctx.plan.fingerprints(i.id) for i in instructions},
                     config.sets_per_instruction)
        await run_stages(ctx, work, tree_slot(shard), after_stage=reporter(store, shard, work))
        work.finish()
    except RunAborted as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}", "aborted": True}
        raise
    except BaseException as exc:
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
        raise
    finally:
        await ctx.aclose()
        usage = {stage: gateway.usage.summary() for stage, gateway in ctx.gateways.items()}
        fields = dict(run=str(runtime.flow_run.id), usage=usage, worker=f"{socket.gethostname()}:{os.getpid()}",
                      seconds=round(time.monotonic() - started, 3), **outcome)
        summary = work.summary(**fields) if work is not None else ShardSummary(name=shard.name, **fields)
        store.write_text(summary.model_dump_json(), *summary_parts(shard.build, shard.key))
    get_run_logger().info("shard %s: %d of %d instructions accepted", shard.name, len(summary.accepted),
                          len(shard.ids))
    return summary.model_dump(mode="json", include={"name", "accepted", "counts", "failures"})
