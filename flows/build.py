"""The `build-collection` flow: ingest, then trees -> sets -> system messages -> responses -> pairs per shard,
then a release.

Prefect sees one task run per (stage, shard), never one per LLM call (docs/ARCHITECTURE.md, principle 4):
inside a task one event loop drives hundreds of calls through the gateway. Shards run concurrently, each through its
stages in order, so no stage waits for the slowest shard of the one before. A crashed (stage, shard)
is retried by Prefect and resumes from the stored rows and the journal; conditions that would fail
every call (`RunAborted`: bad key, spend cap, most calls failing) are not retried.
With `shard_deployment` set, each shard runs instead as a `build-shard` flow run on that deployment's
work pool, so many workers share the build (flows/dispatch.py, flows/build_shard.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE

from facets.llm.batch import BatchRunner
from facets.llm.budget import Budget
from facets.llm.errors import RunAborted
from facets.llm.gateway import Gateway, endpoint_transport
from facets.llm.journal import Journal
from facets.llm.preflight import check_endpoint, choose_structured_output
from facets.llm.slots import CallSlots
from facets.llm.usage import merge_usage
from facets.schemas.config import LLM_STAGES, BuildConfig
from facets.storage import Store
from facets.storage.scratch import sweep as sweep_scratch
from facets.storage.failure_log import FailureLog, recover_failures
from facets.tasks import pairs, preference_sets, preference_trees, responses, system_messages
from facets.flows.dispatch import JournalScope, ShardDispatch, cancel_shard_runs
from facets.flows.report import BuildReport, Progress, publish_artifacts
from facets.schemas.shards import ShardSpec
from facets.tasks.context import BuildContext, all_or_none
from facets.tasks.plan import STAGES, buckets_per_shard, shard_ranges
from facets.tasks.selection import Pool, complete_instructions, near_damage
from facets.tasks.shard import Shard, overlapping
from facets.tasks.templates import load_template

STAGE_RUNNERS = {
    "preference_trees": preference_trees.run,
    "preference_sets": preference_sets.run,
    "system_messages": system_messages.run,
    "responses": responses.run,
    "pairs": pairs.run,
}
# Listeners of progress in this process (the CLI's progress bar); flow parameters must stay serialisable.
PROGRESS_LISTENERS: list[Callable[[Progress], None]] = []


def retry_unless_aborted(task_, task_run, state) -> bool:
    """Prefect retries a crashed (stage, shard), never a run-wide stop (bad key, spend cap, most calls failing)
    nor a storage error (a full disk, a read-only or forbidden data dir): that fails again the same way, and
    the retry would pay again for the calls whose replies could not be journaled."""
    from facets.storage.errors import is_storage_error

    return not isinstance(state.data, RunAborted) and not is_storage_error(state.data)


@task(name="stage", cache_policy=NO_CACHE, task_run_name="{stage}-{shard.name}", retry_delay_seconds=2)
async def run_stage(stage: str, ctx: BuildContext, shard: Shard) -> dict[str, int]:
    await STAGE_RUNNERS[stage](ctx, shard)
    return shard.counts[stage].as_dict()


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_sources(config: BuildConfig) -> str:
    from facets.tasks.ingest import ingest

    return ingest(config.data_dir, config.sources, seed=config.seed).table()


def load_templates(config: BuildConfig) -> dict:
    return {
        "preference_tree": load_template("preference_tree", config.templates_dir, depends_on=(preference_trees.SEEDS,)),
        "system_message": load_template("system_message", config.templates_dir),
        "gold_response": load_template("gold_response", config.templates_dir),
    }


async def open_context(config: BuildConfig, store: Store, preflight: bool = True,
                       stored: dict[str, list[str]] | None = None, journal: Journal | None = None) -> BuildContext:
    """Checks the endpoint and prices, then one gateway per LLM stage over one journal and one budget;
    `stored`: the stage files to look for stored rows in (default: those there now)."""
    models = sorted({config.model_of(stage) for stage in LLM_STAGES})
    if preflight:
        await check_endpoint(config.endpoint, models)
    journal = Journal(config.data_dir) if journal is None else journal
    if preflight:  # the structured-output dialect, resolved into the config the gateways and shard runs get
        endpoint = await choose_structured_output(config.endpoint, [config.model_of("preference_trees")], journal)
        config = config.model_copy(update={"endpoint": endpoint})
    budget = Budget(config.endpoint.max_cost)
    slots, transport = CallSlots(config.endpoint.limits), endpoint_transport(config.endpoint)
    gateways = {stage: Gateway(config.endpoint, journal, budget, slots, priority=LLM_STAGES.index(stage),
                               transport=transport) for stage in LLM_STAGES}
    recover_failures(store)  # those a stopped build kept as they happened and had not written yet
    sweep_scratch(store)  # what killed writers left: staged releases, DuckDB spill, temporary files
    for stage, gateway in gateways.items():
        gateway.failure_log = FailureLog(store, stage)
    for model in models:
        gateways["responses"].check_price(model)
    batches = None
    if config.mode == "batch":
        batches = {stage: BatchRunner(gateways[stage], config.data_dir, poll_initial_s=config.batch_poll_s)
                   for stage in LLM_STAGES}
    return BuildContext(config, store, load_templates(config), gateways, batches, stored, transport)


async def run_stages(ctx: BuildContext, shard: Shard,
                     tree_slot: Callable[[], AbstractAsyncContextManager] = contextlib.nullcontext,
                     after_stage: Callable[[str], Awaitable[None]] | None = None) -> None:
    """One shard through every stage, one Prefect task run per stage, trees inside `tree_slot`. The stages
    run at once, each on the instructions the one before has finished so far (tasks/feed.py); a stage's
    task run starts when its first instruction arrives."""
    stage_task = run_stage.with_options(retries=ctx.config.shard_retries, retry_condition_fn=retry_unless_aborted)
    shard.open_feeds(STAGES)

    async def one(stage: str) -> None:
        await shard.source(stage).started()
        async with tree_slot() if stage == "preference_trees" else contextlib.nullcontext():
            await stage_task(stage, ctx, shard)
        shard.stage_done(stage)
        if after_stage is not None:
            await after_stage(stage)

    await all_or_none([asyncio.create_task(one(stage)) for stage in STAGES])


async def build_shards(ctx: BuildContext, pool: Pool, wanted: int, progress: Progress,
                       complete: frozenset[str] = frozenset(), dispatch: ShardDispatch | None = None) -> list[Shard]:
    """Draws instructions in seeded order until `wanted` are accepted or the pool runs out (decision 8).

    Replacements are drawn as soon as a stage drops instructions, while the other shards run, so the
    build never ends with a second round for the failed few. Few shards make trees at once
    (`max_tree_shards`): tree calls are token-heavy and the later stages request-heavy, and a pipeline
    of shards in different stages keeps both the endpoint's RPM and its TPM busy. Small shards (the
    replacements) take neither a shard nor a tree slot: they start at once. A shard whose
    instructions are all `complete` runs no stage at all: a no-op rebuild reads no stage rows.
    With `dispatch`, each shard runs as a flow run on the shard deployment's pool instead, its trees
    under a Prefect global concurrency limit of `max_tree_shards` slots that all the workers share;
    small shards stay in this process. A shard run reports each stage's end, so its replacements run
    while it goes on."""
    config = ctx.config
    shards: list[Shard] = []
    running: set[asyncio.Task] = set()
    limit = asyncio.Semaphore(config.max_concurrent_shards)
    tree_slots = asyncio.Semaphore(config.max_tree_shards)

    async def one(shard: Shard) -> None:
        if shard.instructions.keys() <= complete:
            shard.reuse_complete(STAGES)
            for stage in STAGES:
                await progress.advance(stage, shard)
            return
        small = config.is_small(len(shard.instructions))
        async with contextlib.nullcontext() if small else limit:
            if dispatch is None or small:
                slot = contextlib.nullcontext if small else lambda: tree_slots
                await run_stages(ctx, shard, slot, after_stage=lambda stage: advance(stage, shard))
                shard.finish()
            else:
                spec = ShardSpec(build=dispatch.build, lo=shard.lo, hi=shard.hi, ids=list(shard.instructions),
                                 tree_limit=dispatch.tree_limit, journal_tag=dispatch.scope.tag,
                                 stored=overlapping(ctx.stored, shard.lo, shard.hi))
                shard.apply(await dispatch.run(spec, on_progress=lambda report: reported(shard, report.alive)))
                for stage in STAGES:
                    await advance(stage, shard)

    async def advance(stage: str, shard: Shard) -> None:
        await progress.advance(stage, shard)
        top_up()

    def reported(shard: Shard, alive: int) -> None:  # a stage of a shard run on a worker ended
        shard.reported(alive)
        top_up()

    def top_up() -> None:
        short = wanted - sum(s.expected() for s in shards)
        if short <= 0 or not pool.remaining:
            return
        instructions = pool.draw(short)
        width = buckets_per_shard(len(instructions), config.shard_size)
        new = [Shard(lo, hi, group, {i.id: ctx.plan.fingerprints(i.id) for i in group}, config.sets_per_instruction)
               for (lo, hi), group in shard_ranges(instructions, width).items()]
        progress.add(len(new) * len(STAGES), len(instructions))
        shards.extend(new)
        running.update(asyncio.create_task(one(shard)) for shard in new)

    top_up()
    try:
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_EXCEPTION)
            running.difference_update(done)
            for task in done:
                task.result()  # a shard that failed for good stops the build
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    if let_go := keep_wanted(shards, wanted, pool.order):
        get_run_logger().warning("%d accepted instructions beyond the %d wanted were let go (a crashed shard run's "
                                 "rerun accepted more than its first run reported); their rows stay stored",
                                 let_go, wanted)
    return shards


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


async def cancel_shards_of(flow, flow_run, state) -> None:
    """on_cancellation: a build cancelled from the UI cancels the shard runs it started."""
    cancelled = await cancel_shard_runs(str(flow_run.id))
    if cancelled:
        get_run_logger().info("cancelled %d shard runs of this build", cancelled)


@flow(name="build-collection", log_prints=True, persist_result=False, on_cancellation=[cancel_shards_of])
async def build_collection(config: BuildConfig) -> dict:
    """Build (or incrementally rebuild) the Multifaceted Collection and publish a release when it changed."""
    from facets.storage.lease import data_dir_lease

    logger = get_run_logger()
    # one build per data dir: a second one would pay for every call again (docs/ARCHITECTURE.md,
    # "One build per data dir")
    async with data_dir_lease(config.data_dir, "build-collection", flow_run=str(runtime.flow_run.id),
                              wait=config.wait_for_lock, timeout_s=config.lock_wait_s, logger=logger):
        return await build_holding_the_data_dir(config, logger)


async def build_holding_the_data_dir(config: BuildConfig, logger) -> dict:
    """The build itself, while this run holds the data dir."""
    started = time.monotonic()
    store = Store(config.data_dir)
    if config.sources:
        logger.info("ingested:\n%s", ingest_sources(config))
    if config.train_after:
        await check_deployment(config.train.deployment, "train_after")
    if config.shard_deployment:
        await check_deployment(config.shard_deployment, "shard_deployment")
    pool = Pool(store, config.seed)
    if not len(pool):
        raise ValueError(f"no instructions in {config.data_dir}: pass sources (NAME=PATH) to ingest some first")
    wanted = min(config.limit or len(pool), len(pool))
    progress = Progress(listeners=PROGRESS_LISTENERS)
    build = str(runtime.flow_run.id)
    scope = JournalScope.of_attempt(build, runtime.flow_run.run_count) if config.shard_deployment else None
    ctx = await open_context(config, store, journal=scope.journal(config.data_dir) if scope else None)
    complete = frozenset(complete_instructions(store, ctx.plan))
    pool.prefer(complete)
    complete -= near_damage(store, complete)  # still drawn first; their shards look for rows a damaged file lost
    dispatch = ShardDispatch(ctx.config, store, build, scope) if scope else None  # the resolved endpoint
    try:
        if dispatch is not None:
            await dispatch.open()
        shards = await build_shards(ctx, pool, wanted, progress, complete, dispatch)
    except BaseException:
        if dispatch is not None:
            await dispatch.cancel_outstanding()
        raise
    finally:
        await ctx.aclose()
        if dispatch is not None:
            await dispatch.close()
    usage = {stage: gateway.usage.summary() for stage, gateway in ctx.gateways.items()}
    if dispatch is not None:  # the shard runs' calls, and those of the small shards run here
        usage = merge_usage([usage, *dispatch.usage])
    report = BuildReport.collect(shards, usage, wanted, time.monotonic() - started)
    report.reruns = dispatch.crashed if dispatch is not None else 0
    report.structured_output = ctx.config.endpoint.structured_output
    if report.accepted < wanted:
        logger.warning("only %d of %d instructions were accepted: the sources ran out; failures are in "
                       "%s/failures", report.accepted, wanted, config.data_dir)
    if config.publish and report.accepted:
        report.release = publish(ctx, shards, report)
        if config.push_to_hub and report.release["is_new"]:
            from facets.tasks.release import push_release

            logger.info("pushed %s to %s", push_release(report.release["path"], config.push_to_hub),
                        config.push_to_hub)
        if config.train_after and report.release["is_new"]:
            report.release["train_run"] = await start_training(config, report.release)
    await publish_artifacts(report)
    logger.info(report.text())
    return report.model_dump(mode="json")


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


def publish(ctx: BuildContext, shards: list[Shard], report: BuildReport) -> dict:
    from facets.tasks.release import ReleaseInfo, publish_release

    info = ReleaseInfo(
        models={stage: ctx.config.model_of(stage) for stage in LLM_STAGES},
        prompt_versions={name: t.version for name, t in ctx.templates.items()},
        usage=report.usage,
        build_seconds=report.seconds, seed=ctx.config.seed,
        config=ctx.config.model_dump(mode="json", exclude={"endpoint": {"api_key"}}),
    )
    release = publish_release(ctx.store, expected_rows(shards), info, seed=ctx.config.seed,
                              test_fraction=ctx.config.test_fraction)
    return {"version": release.version, "path": str(release.path), "is_new": release.is_new}


def expected_rows(shards: list[Shard]):
    """The long (stage, instruction_id, set_index, fingerprint) table of the accepted instructions."""
    import pyarrow as pa

    from facets.tasks.plan import PAIR_INDEX

    columns: dict[str, list] = {"stage": [], "instruction_id": [], "set_index": [], "fingerprint": []}

    def add(stage: str, iid: str, index: int, fp: str) -> None:
        for column, value in zip(columns, (stage, iid, index, fp)):
            columns[column].append(value)

    for shard in shards:
        for iid in shard.accepted():
            plan = shard.plans[iid]
            for index in range(shard.sets):
                add("preference_sets", iid, index, plan.preference_sets)
                add("system_messages", iid, index, plan.system_messages)
                add("responses", iid, index, plan.responses)
            add("pairs", iid, PAIR_INDEX, plan.pairs)
    return pa.table(columns, schema=pa.schema([("stage", pa.string()), ("instruction_id", pa.string()),
                                                ("set_index", pa.int64()), ("fingerprint", pa.string())]))

