"""`facets status`: per stage, the instructions done and missing, and failures by reason; with `--shards`,
the state of every shard run of a build spread over workers (the Prefect server PREFECT_API_URL names)."""
from __future__ import annotations

import argparse
import asyncio

from facets.storage.stages import STAGE_MODELS
from facets.tasks.plan import STAGES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="data directory (default ./data)")
    parser.add_argument("--shards", action="store_true",
                        help="per shard run of the newest build that ran shards on workers (or --build): state, "
                             "stages done, worker, instructions accepted; needs PREFECT_API_URL")
    parser.add_argument("--build", metavar="FLOW_RUN_ID", help="a build-collection flow run (implies --shards)")


def run(args: argparse.Namespace) -> int:
    from facets.storage import Store

    if args.shards or args.build:
        return asyncio.run(print_shard_runs(Store(args.data_dir), args.build))
    with Store(args.data_dir).catalog() as catalog:
        total = catalog.sql("select count(distinct id) from instructions").fetchall()[0][0]
        print(f"{args.data_dir}: {total} instructions")
        print(f"{'stage':<18}{'rows':>10}{'done':>10}{'missing':>10}")
        for stage in STAGE_MODELS:
            if stage == "instructions":
                continue
            rows, done = catalog.sql(f"select count(*), count(distinct instruction_id) from {stage}").fetchall()[0]
            print(f"{stage:<18}{rows:>10}{done:>10}{total - done:>10}")
        failures = catalog.sql("select stage, reason, count(*) from failures group by 1, 2 order by 3 desc").fetchall()
        for stage, reason, count in failures:
            print(f"failed  {stage}:{reason} x{count}")
        latest = catalog.store.read_text("releases", "LATEST")
        print(f"latest release: {latest.strip() if latest else 'none'}")
    return 0


async def print_shard_runs(store, build: str | None) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    from facets.flows.dispatch import summary_parts
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

    from facets.flows.dispatch import progress_parts

    return Counter(name.split(".", 1)[0] for name in store.names(*progress_parts(build)))
