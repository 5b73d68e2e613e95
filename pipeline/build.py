"""A build of the collection: ingest, then trees -> sets -> system messages -> responses -> pairs per shard, then
a release (docs/ARCHITECTURE.md, "One instruction's path").

Shards run concurrently, each through its stages, so no stage waits for the slowest shard of the one before.
With `shard_deployment` set, full-size shards run as `build-shard` flow runs on that deployment's work pool,
so many workers share the build (pipeline/dispatch.py, flows/build_shard.py).
"""
from __future__ import annotations

import time

from prefect import get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from facets.llm.usage import merge_usage
from facets.pipeline.context import BuildContext
from facets.pipeline.dispatch import JournalScope, ShardDispatch
from facets.pipeline.open_context import open_context
from facets.pipeline.publish import publish
from facets.pipeline.report import BuildReport, Progress, progress_listeners, publish_artifacts
from facets.pipeline.scheduler import OnWorkPool, build_shards
from facets.pipeline.selection import Pool, complete_instructions, near_damage
from facets.pipeline.shard import Shard
from facets.schemas.config import BuildConfig
from facets.storage import Store


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_sources(config: BuildConfig) -> str:
    from facets.ingest.pool import ingest

    return ingest(config.data_dir, config.sources, seed=config.seed).table()


async def run_build(config: BuildConfig, logger) -> dict:
    """The build itself, while this flow run holds the data dir: its report, as JSON."""
    started = time.monotonic()
    store = Store(config.data_dir)
    if config.sources:
        logger.info("ingested:\n%s", ingest_sources(config))
    if config.train_after:
        await check_deployment(config.train.deployment, "train_after")
    if config.shard_deployment:
        await check_deployment(config.shard_deployment, "shard_deployment")
    pool = Pool(store, config.seed, config.quotas)
    if not len(pool):
        raise ValueError(f"no instructions in {config.data_dir}: pass sources (NAME=PATH) to ingest some first")
    wanted = min(config.limit or len(pool), len(pool))
    progress = Progress(listeners=list(progress_listeners()))
    build = str(runtime.flow_run.id)
    scope = JournalScope.of_attempt(build, runtime.flow_run.run_count) if config.shard_deployment else None
    ctx = await open_context(config, store, journal=scope.journal(config.data_dir) if scope else None)
    complete = frozenset(complete_instructions(store, ctx.plan))
    pool.prefer(complete)
    complete -= near_damage(store, complete)  # still drawn first; their shards look for rows a damaged file lost
    dispatch = ShardDispatch(ctx.config, store, build, scope) if scope else None  # the resolved endpoint
    shards = await _shards_built(ctx, pool, wanted, progress, complete, dispatch)
    usage = {stage: gateway.usage.summary() for stage, gateway in ctx.gateways.items()}
    if dispatch is not None:  # the shard runs' calls, and those of the small shards run here
        usage = merge_usage([usage, *dispatch.usage])
    report = BuildReport.collect([shard.summary() for shard in shards], usage, wanted, time.monotonic() - started)
    report.reruns = dispatch.crashed if dispatch is not None else 0
    report.structured_output = ctx.config.endpoint.structured_output
    if report.accepted < wanted:
        logger.warning("only %d of %d instructions were accepted: the sources ran out; failures are in "
                       "%s/failures", report.accepted, wanted, config.data_dir)
    if config.publish and report.accepted:
        report.release = publish(ctx, shards, report)
        if config.push_to_hub and report.release["is_new"]:
            from facets.release.publish import push_release

            logger.info("pushed %s to %s", push_release(report.release["path"], config.push_to_hub),
                        config.push_to_hub)
        if config.train_after and report.release["is_new"]:
            report.release["train_run"] = await start_training(config, report.release)
    await publish_artifacts(report)
    logger.info(report.text())
    return report.model_dump(mode="json")


async def _shards_built(ctx: BuildContext, pool: Pool, wanted: int, progress: Progress, complete: frozenset[str],
                        dispatch: ShardDispatch | None) -> list[Shard]:
    """The build's shards, run here or (with `dispatch`) on the shard deployment's pool; the context is closed
    after them, and shard runs still out are cancelled when the build stops."""
    try:
        if dispatch is not None:
            await dispatch.open()
        executor = OnWorkPool(ctx, dispatch) if dispatch is not None else None
        return await build_shards(ctx, pool, wanted, progress, complete, executor)
    except BaseException:
        if dispatch is not None:
            await dispatch.cancel_outstanding()
        raise
    finally:
        await ctx.aclose()
        if dispatch is not None:
            await dispatch.close()


async def check_deployment(name: str, field: str) -> None:
    """`train_after` and `shard_deployment` need their deployment on the server: found out before any paid call."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise ValueError(f"{field}: the server has no deployment {name}; apply prefect.yaml "
                             "(`facets server` does, or `prefect --no-prompt deploy --all`)") from None


async def start_training(config: BuildConfig, release: dict) -> str:
    """A run of the train deployment on the new release; the build does not wait for it."""
    from prefect.deployments import run_deployment

    parameters = {"config": config.train.train_config(release["path"], release["version"], config.data_dir)}
    run = await run_deployment(name=config.train.deployment, parameters=parameters, timeout=0,
                               tags=["facets", "train_after"])
    get_run_logger().info("started %s (flow run %s) on release %s", config.train.deployment, run.id, release["version"])
    return str(run.id)
