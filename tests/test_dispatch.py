"""The parts of scale-out that need no workers: one `build-shard` run in this process (its rows, its
summary, a rerun that asks nothing), the spend split across shard runs, the zombie automations on a
real Prefect server, and `shard_deployment` checked before any paid call. The workers themselves are in
test_scale_out.py (slow)."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from facets.flows.automations import NAME, START_NAME, ensure_zombie_automations, zombie_automations
from facets.flows.build import build_collection
from facets.flows.build_shard import build_shard
from facets.flows.dispatch import SpendSplit, summary_parts
from facets.llm.errors import BudgetExceeded
from facets.llm.simulator import run_simulator
from facets.llm.usage import merge_usage
from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits
from facets.schemas.shards import ShardSpec, ShardSummary
from facets.storage import Store
from facets.tasks.ingest import ingest
from facets.tasks.selection import Pool

NECTAR = Path(__file__).parent / "data" / "sources" / "nectar" / "data.jsonl"


@pytest.fixture(scope="module", autouse=True)
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


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
    assert second["accepted"] == first["accepted"]
    summary = ShardSummary.model_validate_json(Store(data_dir).read_text(*summary_parts("b1", spec.key)))
    assert summary.accepted == first["accepted"] and summary.error is None and summary.run
    # the second run's summary: every accepted row reused, and only the failed instructions asked again
    assert summary.counts["responses"]["reused"] == 3 * len(summary.accepted)
    failed = len(ids) - len(first["accepted"])
    assert again == sum(u["requests"] for u in summary.usage.values()) <= 3 * 7 * failed
    assert len({row["instruction_id"] for row in Store(data_dir).read("pairs").to_pylist()}) == len(first["accepted"])


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
    assert "prefect.flow-run.heartbeat" in starts.trigger.expect
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
