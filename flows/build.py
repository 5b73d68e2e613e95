"""The `build-collection` flow: a build of the collection (pipeline/build.py) while it holds the data dir."""
from __future__ import annotations

from prefect import flow, get_run_logger, runtime

from facets.pipeline.build import run_build
from facets.pipeline.dispatch import cancel_shard_runs
from facets.schemas.config import BuildConfig
from facets.storage.lease import data_dir_lease


async def cancel_shards_of(flow, flow_run, state) -> None:
    """on_cancellation: a build cancelled from the UI cancels the shard runs it started."""
    cancelled = await cancel_shard_runs(str(flow_run.id))
    if cancelled:
        get_run_logger().info("cancelled %d shard runs of this build", cancelled)


@flow(name="build-collection", log_prints=True, persist_result=False, on_cancellation=[cancel_shards_of])
async def build_collection(config: BuildConfig) -> dict:
    """Build (or incrementally rebuild) the Multifaceted Collection and publish a release when it changed."""
    logger = get_run_logger()
    # one build per data dir: a second one would pay for every call again (docs/ARCHITECTURE.md,
    # "One build per data dir")
    async with data_dir_lease(config.data_dir, "build-collection", flow_run=str(runtime.flow_run.id),
                              wait=config.wait_for_lock, timeout_s=config.lock_wait_s, logger=logger):
        return await run_build(config, logger)

