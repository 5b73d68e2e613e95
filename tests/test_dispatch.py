"""The parts of scale-out that need no workers: one `build-shard` run in this process (its rows, its
summary, a rerun that asks nothing), the spend split across shard runs, the zombie automations on a
real Prefect server, and `shard_deployment` checked before any paid call. The workers themselves are in
test_scale_out.py (slow)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from facets.flows.automations import NAME, START_NAME, ensure_zombie_automations, zombie_automations
from facets.flows.build import build_collection
from facets.pipeline.scheduler import keep_wanted
from facets.flows.build_shard import build_shard
from facets.pipeline.dispatch import (
    JournalScope,
    ProgressWatcher,
    RunWatcher,
    SpendSplit,
    progress_parts,
    summary_parts,
)
from facets.llm.errors import BudgetExceeded
from facets.llm.journal import Journal, JournalEntry, request_key
from facets.simulator.server import run_simulator
from facets.llm.usage import merge_usage
from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits
from facets.schemas.shards import ShardProgress, ShardSpec, ShardSummary
from facets.storage import Store
from facets.ingest.pool import ingest
from facets.schemas.stages import STAGE_NAMES
from facets.pipeline.selection import Pool
from facets.pipeline.shard import Shard, overlapping

NECTAR = Path(__file__).parent / "data" / "sources" / "nectar" / "data.jsonl"


pytestmark = pytest.mark.usefixtures("prefect_server")


def test_one_shard_run_writes_its_rows_and_summary_and_a_rerun_asks_only_its_failures_again(tmp_path):
    data_dir = str(tmp_path / "data")
    ingest(data_dir, [f"nectar={NECTAR}"], seed=0)
    ids = Pool(Store(data_dir), seed=0).order[:3]
    with run_simulator(seed=1) as sim:
        config = BuildConfig(data_dir=data_dir, endpoint=EndpointConfig(base_url=sim.base_url, api_key="k",
                                                                         model="facets-sim",
                                                                         limits=RateLimits(rpm=60_000)))
        spec = ShardSpec(build="b1", lo=0, hi=1023, ids=ids)
        first = asyncio.run(build_shard(config, spec))
        asked = sim.stats()["requests"]
        second = asyncio.run(build_shard(config, spec))
        again = sim.stats()["requests"] - asked
    assert first["accepted"] and set(first["accepted"]) <= set(ids) and asked >= 7 * len(first["accepted"])
    assert set(first["accepted"]) <= set(second["accepted"])  # a failed one asked again may come good
    summary = ShardSummary.model_validate_json(Store(data_dir).read_text(*summary_parts("b1", spec.key)))
    assert summary.accepted == second["accepted"] and summary.error is None and summary.run
    # the second run's summary: every accepted row reused, and only the failed instructions asked again
    assert summary.counts["responses"]["reused"] >= 3 * len(first["accepted"])
    failed = len(ids) - len(first["accepted"])
    assert again == sum(u["requests"] for u in summary.usage.values()) <= 3 * 7 * failed
    assert len({row["instruction_id"] for row in Store(data_dir).read("pairs").to_pylist()}) == len(second["accepted"])


def test_a_shard_run_reports_each_stage_and_the_build_hears_each_report_once(tmp_path):
    """The build draws replacements while a shard run goes on: the run reports how many instructions came
    through each stage, and the watcher hands each report of a run in flight to its listener once."""
    data_dir = str(tmp_path / "data")
    ingest(data_dir, [f"nectar={NECTAR}"], seed=0)
    ids = Pool(Store(data_dir), seed=0).order[:6]
    spec = ShardSpec(build="b3", lo=0, hi=1023, ids=ids)
    with run_simulator(seed=1, faults={"length": 0.4}) as sim:  # stages drop some instructions
        config = BuildConfig(data_dir=data_dir, endpoint=EndpointConfig(base_url=sim.base_url, api_key="k",
                                                                         model="facets-sim",
                                                                         limits=RateLimits(rpm=60_000)))
        result = asyncio.run(build_shard(config, spec))
    summary = ShardSummary.model_validate_json(Store(data_dir).read_text(*summary_parts("b3", spec.key)))
    watcher = ProgressWatcher(Store(data_dir), "b3")
    heard = watcher.read_new({summary.run, "another-run"})
    assert [r.stage for r in heard] == list(STAGE_NAMES) and {r.run for r in heard} == {summary.run}
    assert watcher.read_new({summary.run}) == [], "each report is read once"
    alive = [r.alive for r in heard]
    assert alive == sorted(alive, reverse=True) and alive[0] <= len(ids)
    assert alive[-1] == len(result["accepted"]) < len(ids), "the faults dropped none: the test shows nothing"
    Store(data_dir).write_text("{}", *progress_parts("b3", "finished-run", "pairs"))
    assert watcher.read_new({"another-run"}) == [], "a run not in flight: its reports are not read"


def test_the_build_hears_a_shard_runs_stage_reports_in_its_event_loop(tmp_path):
    """The listener may start replacement shards: it runs in the build's loop, not in a reading thread."""
    store = Store(str(tmp_path / "data"))
    report = ShardProgress(run="r1", stage="preference_trees", alive=7)
    store.write_text(report.model_dump_json(), *progress_parts("b4", "r1", "preference_trees"))

    async def main():
        heard = asyncio.get_running_loop().create_future()
        watcher = ProgressWatcher(store, "b4", poll_s=0.01)
        watcher.listen("r1", lambda r: heard.set_result((r, asyncio.get_running_loop())))
        try:
            return await asyncio.wait_for(heard, 10), asyncio.get_running_loop()
        finally:
            await watcher.close()

    (got, loop), build_loop = asyncio.run(main())
    assert got == report and loop is build_loop


def test_a_build_that_accepted_more_than_it_wanted_keeps_those_drawn_first():
    def shard(lo: int, ids: list[str]) -> Shard:
        made = Shard(lo, lo, [], {}, 3)
        made.apply(ShardSummary(name=made.name, accepted=ids))
        return made

    order = ["d", "a", "f", "b", "e", "c"]  # the pool's draw order
    shards = [shard(0, ["a", "b", "c"]), shard(1, ["d", "e"]), shard(2, ["f"])]
    assert keep_wanted(shards, 4, order) == 2
    assert [s.accepted() for s in shards] == [["a", "b"], ["d"], ["f"]]
    assert keep_wanted(shards, 10, order) == 0
    assert sum(len(s.accepted()) for s in shards) == 4


def test_a_shard_run_with_instructions_the_data_dir_lacks_says_so_in_its_summary(tmp_path):
    data_dir = str(tmp_path / "data")
    ingest(data_dir, [f"nectar={NECTAR}"], seed=0)
    with run_simulator() as sim:
        config = BuildConfig(data_dir=data_dir, endpoint=EndpointConfig(base_url=sim.base_url, api_key="k",
                                                                         model="facets-sim"))
        with pytest.raises(ValueError, match="must share one data dir"):
            asyncio.run(build_shard(config, ShardSpec(build="b2", lo=0, hi=7, ids=["not-an-id"])))
        assert sim.stats()["requests"] == 0
    spec = ShardSpec(build="b2", lo=0, hi=7, ids=["not-an-id"])
    summary = ShardSummary.model_validate_json(Store(data_dir).read_text(*summary_parts("b2", spec.key)))
    assert "must share one data dir" in summary.error and not summary.aborted


def test_the_spend_split_never_hands_out_more_than_the_cap():
    split = SpendSplit(10.0, parts=4)
    parts = [split.take(f"s{i}") for i in range(4)]
    assert sum(parts) == pytest.approx(10.0)
    split.settle("s0", 1.0)            # spent less than its part: the rest is free again
    split.settle("s1", None)           # crashed: counted as its whole part
    fresh = split.take("s4")
    # 10 - 3.5 spent - 5 held by two runs = 1.5 free, shared by the two free slots
    assert split.spent == pytest.approx(3.5) and fresh == pytest.approx(0.75)
    assert split.spent + sum(split.held.values()) <= 10.0
    spent_all = SpendSplit(1.0, parts=1)
    spent_all.settle("a", spent_all.take("a"))
    with pytest.raises(BudgetExceeded, match="max_cost"):
        spent_all.take("b")
    assert SpendSplit(None, parts=4).take("x") is None


def test_usage_of_shard_runs_adds_up_and_an_unknown_cost_stays_unknown():
    a = {"responses": {"requests": 3, "prompt_tokens": 10, "cost_usd": 0.5, "errors": {"http_500": 1},
                       "latency_p50_s": 1}}
    b = {"responses": {"requests": 2, "prompt_tokens": 5, "cost_usd": 0.25, "errors": {"http_500": 2, "drop": 1}}}
    merged = merge_usage([a, b])["responses"]
    assert merged == {"requests": 5, "prompt_tokens": 15, "cost_usd": 0.75, "errors": {"http_500": 3, "drop": 1}}
    assert merge_usage([a, {"responses": {"cost_usd": None}}])["responses"]["cost_usd"] is None


def test_the_run_watcher_returns_each_run_once_it_is_final_and_leaves_running_ones_waiting():
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Crashed, Running

    @flow(name="watched")
    def watched() -> None:
        pass

    async def scenario():
        watcher = RunWatcher(poll_s=0.2)
        async with get_client() as client:
            runs = [await client.create_flow_run(watched, name=f"watched-{i}") for i in range(3)]
            for run in runs:
                await client.set_flow_run_state(run.id, Running(), force=True)
            waits = [asyncio.create_task(watcher.finished(run.id)) for run in runs]
            await client.set_flow_run_state(runs[0].id, Completed(), force=True)
            await client.set_flow_run_state(runs[1].id, Crashed(message="worker died"), force=True)
            first, second = await asyncio.wait_for(asyncio.gather(waits[0], waits[1]), 30)
            await asyncio.sleep(1)  # five polls more
            assert not waits[2].done(), "a Running run is not final"
            assert first.id == runs[0].id and first.state.is_completed()
            assert second.id == runs[1].id and second.state.is_crashed()
            await client.set_flow_run_state(runs[2].id, Completed(), force=True)
            assert (await asyncio.wait_for(waits[2], 30)).state.is_completed()
        await watcher.close()
        assert not watcher.waiting

    asyncio.run(scenario())


def test_the_zombie_automations_are_created_on_the_server_once(tmp_path):
    from prefect.client.orchestration import get_client

    with pytest.raises(ValueError, match="beats every 30 s"):
        zombie_automations(after_s=30)
    asyncio.run(ensure_zombie_automations(after_s=45, start_within_s=120))
    asyncio.run(ensure_zombie_automations(after_s=60))  # again, with other timing: replaced, not doubled

    async def read():
        async with get_client() as client:
            return [await client.read_automations_by_name(name) for name in (NAME, START_NAME)]

    (beats,), (starts,) = asyncio.run(read())
    assert beats.trigger.within.total_seconds() == 60 and beats.trigger.after == {"prefect.flow-run.heartbeat"}
    assert starts.trigger.after == {"prefect.flow-run.Pending"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Running"} <= starts.trigger.expect
    assert "prefect.flow-run.Running" not in beats.trigger.expect  # a run that beat once and stopped is dead
    assert beats.actions[0].state.value == "CRASHED" and beats.trigger.posture.value == "Proactive"


def test_a_shard_deployment_that_is_not_there_stops_the_build_before_any_call(tmp_path):
    with run_simulator() as sim:
        config = BuildConfig(sources=[f"nectar={NECTAR}"], limit=2, data_dir=str(tmp_path / "data"),
                             shard_deployment="build-shard/nowhere",
                             endpoint=EndpointConfig(base_url=sim.base_url, api_key="k", model="facets-sim"))
        with pytest.raises(ValueError, match="no deployment build-shard/nowhere"):
            asyncio.run(build_collection(config))
        assert sim.stats()["requests"] == 0
    with pytest.raises(ValueError, match="FLOW/DEPLOYMENT"):
        BuildConfig(shard_deployment="build-shard")


def _two_ranges(data_dir: str) -> tuple[list[str], list[str]]:
    """Instruction ids of the lower and of the upper half of the bucket ring, three of each."""
    pool = Pool(Store(data_dir), seed=0)
    instructions = pool.load(pool.order)
    low = [i.id for i in instructions if i.bucket < 512][:3]
    high = [i.id for i in instructions if i.bucket >= 512][:3]
    return low, high


def test_a_shard_run_reads_the_journal_before_its_build_and_its_own_range_not_the_other_shards(tmp_path):
    data_dir = str(tmp_path / "data")
    ingest(data_dir, [f"nectar={NECTAR}"], seed=0)
    low, high = _two_ranges(data_dir)
    earlier = Journal(data_dir)  # a call of an earlier build: every shard run of this one may need it
    earlier.put(JournalEntry(key=request_key("http://sim/v1", "m", [{"role": "user", "content": "old"}], None, {}, None),
                             model="m", content="old"))
    earlier.close()
    scope = JournalScope.of_attempt("build-1", 1)
    with scope.journal(data_dir) as own:  # the build's own writer: its small shards, never a shard run's
        own.put(JournalEntry(key=request_key("http://sim/v1", "m", [{"role": "user", "content": "small"}], None, {},
                                             None), model="m", content="small"))
    with run_simulator(seed=1) as sim:
        config = BuildConfig(data_dir=data_dir, endpoint=EndpointConfig(base_url=sim.base_url, api_key="k",
                                                                         model="facets-sim",
                                                                         limits=RateLimits(rpm=60_000)))
        asyncio.run(build_shard(config, ShardSpec(build="build-1", lo=0, hi=511, ids=low, journal_tag=scope.tag)))
    with Journal(data_dir) as plain:
        everything = len(plain)
    assert everything >= 2 + 7  # the two above and at least one instruction's calls
    with scope.journal(data_dir, 512, 1023) as other_shard:
        assert len(other_shard) == 1  # the earlier build's call only
    with scope.journal(data_dir, 0, 255) as same_range:  # a rerun of the lower shard, or a part of it
        assert len(same_range) == everything - 1
    with JournalScope.of_attempt("build-1", 2).journal(data_dir, 512, 1023) as next_attempt:
        assert len(next_attempt) == everything  # a retried build reads all that its first attempt paid for


def test_a_shard_run_looks_for_stored_rows_where_the_build_listed_them_and_under_its_own_name(tmp_path):
    data_dir = str(tmp_path / "data")
    ingest(data_dir, [f"nectar={NECTAR}"], seed=0)
    low, _ = _two_ranges(data_dir)
    with run_simulator(seed=1) as sim:
        config = BuildConfig(data_dir=data_dir, endpoint=EndpointConfig(base_url=sim.base_url, api_key="k",
                                                                         model="facets-sim",
                                                                         limits=RateLimits(rpm=60_000)))
        first = asyncio.run(build_shard(config, ShardSpec(build="b1", lo=0, hi=511, ids=low)))
        accepted, paid = len(first["accepted"]), sim.stats()["requests"]
        listing = {stage: Store(data_dir).files(stage) for stage in STAGE_NAMES}
        # wider shards of later builds: the b0000-0511 files are not their own, so only a listing finds them
        unlisted = asyncio.run(build_shard(config, ShardSpec(build="b2", lo=0, hi=1023, ids=first["accepted"])))
        listed = asyncio.run(build_shard(config, ShardSpec(build="b3", lo=0, hi=767, ids=first["accepted"],
                                                           stored=overlapping(listing, 0, 767))))
        asked_again = sim.stats()["requests"] - paid
    assert accepted and unlisted["counts"]["responses"]["reused"] == 0  # remade, from the journal
    assert listed["counts"]["responses"]["reused"] == 3 * accepted
    assert asked_again == 0
