"""`facets status`: per stage, the instructions done and missing (of those builds drew), the bench's items
apart, and failures by reason; with `--shards`, the state of every shard run of a build spread over workers
(the Prefect server PREFECT_API_URL names)."""
from __future__ import annotations

import argparse
import asyncio
import os
import sys

from facets.schemas.stages import BENCH_RUBRICS, BENCH_STAGES, STAGE_NAMES as STAGES



def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="data directory (default ./data)")
    parser.add_argument("--shards", action="store_true",
                        help="per shard run of the newest build that ran shards on workers (or --build): state, "
                             "stages done, worker, instructions accepted; needs PREFECT_API_URL")
    parser.add_argument("--build", metavar="FLOW_RUN_ID", help="a build-collection flow run (implies --shards)")


def run(args: argparse.Namespace) -> int:
    quiet_prefect()
    from facets.storage import Catalog, Store

    store = Store(args.data_dir)
    missing = missing_data_dir(store)
    if missing:
        print(f"facets status: error: {missing}", file=sys.stderr)
        return 2
    if args.shards or args.build:
        return shard_runs(store, args.build)
    with Catalog(store) as catalog:
        add_bench_rubrics_view(catalog)
        print_collection(catalog, args.data_dir)
        print_bench(catalog)
        print_failures(catalog)
        latest = catalog.store.read_text("releases", "LATEST")
        print(f"latest release: {latest.strip() if latest else 'none'}")
    return 0


def quiet_prefect() -> None:
    """Before Prefect is imported (`--shards`): no telemetry, which needs the network."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def shard_runs(store, build: str | None) -> int:
    import httpx

    try:
        return asyncio.run(print_shard_runs(store, build))
    except (httpx.ConnectError, httpx.ConnectTimeout) as error:
        from prefect.settings import PREFECT_API_URL

        print(f"facets status: error: cannot reach the Prefect server at {PREFECT_API_URL.value()} ({error}): "
              "start it (facets server) or set PREFECT_API_URL", file=sys.stderr)
        return 2


def missing_data_dir(store) -> str | None:
    """A local data dir that does not exist is a typo, not an empty collection."""
    if store.is_local and not store.fs.isdir(store.root):
        return f"data dir {store.uri} does not exist (pass --data-dir)"
    return None


def add_bench_rubrics_view(catalog) -> None:
    """`bench_rubrics`: the bench's own stage (not one of the collection's views)."""
    files = catalog.store.whole(catalog.store.files(BENCH_RUBRICS))
    if files:
        listing = ", ".join("'" + catalog.store.uri_of(f).replace("'", "''") + "'" for f in files)
        catalog.sql(f"create or replace view {BENCH_RUBRICS} as "
                    f"select instruction_id from read_parquet([{listing}], union_by_name=true)")
    else:
        catalog.sql(f"create or replace view {BENCH_RUBRICS} as select ''::varchar as instruction_id where false")


def started_ids(stages) -> str:
    """SQL: every instruction id a stage wrote a row or a failure for (failure keys are `<id>` or `<id>#<row>`)."""
    rows = " union ".join(f"select instruction_id as id from {stage}" for stage in stages)
    names = ", ".join(f"'{stage}'" for stage in stages)
    return f"{rows} union select split_part(key, '#', 1) from failures where stage in ({names})"


def print_collection(catalog, data_dir: str) -> None:
    """Counts over the instructions builds drew (an instruction with a row or a failure in a stage):
    a `--limit` build leaves the rest of the pool undrawn, which is not missing."""
    total = catalog.sql("select count(distinct id) from instructions").fetchall()[0][0]
    catalog.sql(f"create temp table drawn as select distinct id from ({started_ids(STAGES)}) "
                "where id in (select id from instructions)")
    drawn = catalog.sql("select count(*) from drawn").fetchall()[0][0]
    print(f"{data_dir}: {total} instructions ingested, {drawn} drawn by builds, "
          f"{total - drawn} in the pool not drawn yet")
    print_stage_table(catalog, "collection", STAGES, "drawn")


def print_bench(catalog) -> None:
    """Items of `facets bench`: its instructions come from benchmarks, not from the ingested pool."""
    catalog.sql(f"create temp table bench_items as select distinct id from ({started_ids(BENCH_STAGES)}) "
                "where id not in (select id from instructions)")
    items = catalog.sql("select count(*) from bench_items").fetchall()[0][0]
    if items:
        print(f"bench: {items} items drawn from benchmarks")
        print_stage_table(catalog, "bench", BENCH_STAGES, "bench_items")


def print_stage_table(catalog, title: str, stages, ids: str) -> None:
    """Per stage: rows, instructions done, and missing: drawn but with no row (failed or not reached yet)."""
    print(f"{title + ' stage':<20}{'rows':>10}{'done':>10}{'missing':>10}")
    total = catalog.sql(f"select count(*) from {ids}").fetchall()[0][0]
    for stage in stages:
        rows, done = catalog.sql(f"select count(*), count(distinct instruction_id) from {stage} "
                                 f"where instruction_id in (select id from {ids})").fetchall()[0]
        print(f"{stage:<20}{rows:>10}{done:>10}{total - done:>10}")


def print_failures(catalog) -> None:
    bench = (f"stage = '{BENCH_RUBRICS}' or (stage in ({', '.join(repr(s) for s in STAGES)}) "
             "and split_part(key, '#', 1) not in (select id from instructions))")
    failures = catalog.sql(f"select case when {bench} then 'bench ' else '' end, stage, reason, count(*) "
                           "from failures group by 1, 2, 3 order by 4 desc").fetchall()
    for where, stage, reason, count in failures:
        print(f"failed  {where}{stage}:{reason} x{count}")


async def print_shard_runs(store, build: str | None) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    from facets.pipeline.dispatch import summary_parts
    from facets.schemas.shards import ShardSummary

    async with get_client() as client:
        if build is None:  # the newest build that started shard runs: the tag of the newest shard run
            newest = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["build-shard"])),
                                                 sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=1)
            tags = [t for run in newest for t in run.tags if t.startswith("build:")]
            if not tags:
                print("no build-shard run on this Prefect server (builds ran their shards in their own process)")
                return 1
            build = tags[0].split(":", 1)[1]
        of_build = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"build:{build}"]))
        runs = await client.read_flow_runs(flow_run_filter=of_build, sort=FlowRunSort.EXPECTED_START_TIME_ASC)
    if not runs:
        print(f"build {build}: no shard runs (its shards ran in its own process, or it has not started them)")
        return 0
    print(f"build {build}: {len(runs)} shard runs")
    done = stages_done(store, build)
    print(f"{'shard run':<26}{'state':<12}{'stages done':<18}{'worker':<28}{'accepted':>10}{'seconds':>9}")
    for run in runs:
        key = run.name.rsplit("-", 1)[0]  # runs are named <shard key>-<attempt>
        text = store.read_text(*summary_parts(build, key))
        summary = ShardSummary.model_validate_json(text) if text else None
        mine = summary is not None and summary.run == str(run.id)
        worker = summary.worker if mine else (run.infrastructure_pid or "")
        accepted = str(len(summary.accepted)) if mine else ""
        seconds = f"{summary.seconds:.0f}" if mine else ""
        state = run.state.name if run.state else "?"
        stages = f"{done.get(str(run.id), 0)} of {len(STAGES)}"
        print(f"{run.name:<26}{state:<12}{stages:<18}{worker[:27]:<28}{accepted:>10}{seconds:>9}")
    return 0


def stages_done(store, build: str) -> dict[str, int]:
    """Per shard run, how many of its stages have ended: the reports it left (one listing)."""
    from collections import Counter

    from facets.pipeline.dispatch import progress_parts

    return Counter(name.split(".", 1)[0] for name in store.names(*progress_parts(build)))
