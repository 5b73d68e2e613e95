"""Scale-out: one build shared by three workers of a local Prefect server on PostgreSQL, data on a loopback
S3 server, one rate limit through Redis. One worker is killed (with its flow runs) mid-build; the
server's zombie automation marks its shard run Crashed and the build runs that shard again elsewhere.
What was paid is counted at the simulator, in its own process."""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from facets.flows.commands.server import LocalPrefect, free_port
from facets.simulator.server import SimulatorProcess
from facets.storage import Catalog, Store
from facets.testing.s3_server import S3Server, apply_env, restore_env
from facets.schemas.stages import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[1]
NECTAR = ROOT / "tests" / "data" / "sources" / "nectar" / "data.jsonl"
REDIS = "redis://127.0.0.1:6379/0"
pytestmark = pytest.mark.usefixtures("redis_url")  # one limit shared through Redis: skipped where none answers
RPM = 300
IN_FLIGHT = 8
ZOMBIE_AFTER_S = 40
START_WITHIN_S = 60


def build_config(data_dir: str, **overrides) -> dict:
    limits = {"rpm": RPM, "max_in_flight": IN_FLIGHT, "share_via": REDIS, "burst_s": 1.0}
    return {"sources": [f"nectar={NECTAR}"], "limit": 16, "seed": 4, "shard_size": 4, "data_dir": data_dir,
            "endpoint": {"model": "facets-sim", "limits": limits}, "publish": True, **overrides}


class Killer(threading.Thread):
    """Once the build is calling, kills the first worker with a flow run process, and all it started (a
    lost machine)."""

    def __init__(self, stack: LocalPrefect, calling, timeout_s: float = 240.0):
        super().__init__(daemon=True)
        self.stack, self.calling, self.timeout_s = stack, calling, timeout_s
        self.min_age_s = 3.0
        self.killed: list[psutil.Process] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline and not self.calling():
            time.sleep(0.5)
        while time.monotonic() < deadline and not self.killed:
            for worker in self.stack.workers:
                try:
                    family = psutil.Process(worker.process.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                if any(time.time() - child.create_time() > self.min_age_s for child in family):
                    for proc in [psutil.Process(worker.process.pid), *family]:
                        try:
                            proc.kill()
                        except psutil.NoSuchProcess:
                            pass
                    self.killed = family
                    return
            time.sleep(0.3)


def worker_env(tmp_path: Path, s3: S3Server, sim: SimulatorProcess) -> dict:
    """What the workers and the commands run with: S3 and the simulator, a Prefect home of the test's own."""
    env = {**os.environ, **s3.env(), "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": sim.base_url}
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(name, None)
    return env


def facets_build(config: dict, env: dict, path: Path) -> str:
    """`facets build --config FILE`, as a user runs it; returns the release version it printed."""
    path.write_text(json.dumps(config), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "build", "--config", str(path), "--quiet"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "accepted 16 of 16 instructions" in done.stdout, done.stdout
    return re.search(r"^release (\w+) \(new release\)", done.stdout, re.M)[1]


def crashed_runs(api_url: str, flow: str) -> int:
    """Runs of `flow` that were ever Crashed, whatever state they ended in."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    async def read():
        async with PrefectClient(api_url) as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])))
            histories = [await client.read_flow_run_states(run.id) for run in runs]
            return [run for run, states in zip(runs, histories) if any(state.is_crashed() for state in states)]

    return len(asyncio.run(read()))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_workers_build_one_release_equal_to_one_process_and_outlive_a_killed_worker(tmp_path, postgres):
    with S3Server() as s3, SimulatorProcess(seed=9, latency_ms=800, jitter_ms=200,
                                            faults={"http_500": 0.03, "http_503": 0.03}) as sim:
        env = worker_env(tmp_path, s3, sim)
        data_dir = f"{s3.make_bucket(f'scale-{uuid.uuid4().hex[:8]}')}/data"
        with LocalPrefect(ROOT, port=free_port(), database_url=postgres, pools=["cpu"], cpu_workers=3,
                          worker_limit=2, zombie_after_s=ZOMBIE_AFTER_S, start_within_s=START_WITHIN_S,
                          log_dir=tmp_path / "logs", env=env) as stack:
            killer = Killer(stack, calling=lambda: sim.stats()["requests"] >= 30)
            killer.start()
            spread = facets_build(build_config(data_dir, shard_deployment="build-shard/default"),
                                  {**env, "PREFECT_API_URL": stack.api_url}, tmp_path / "spread.json")
            killer.join(1)
            crashed = crashed_runs(stack.api_url, "build-shard")
            build_crashed = crashed_runs(stack.api_url, "build-collection")
            status = subprocess.run([sys.executable, "-m", "facets.flows.cli", "status", "--shards", "--data-dir",
                                     data_dir], env={**env, "PREFECT_API_URL": stack.api_url}, cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
        stats = sim.stats()
        previous = apply_env(s3)
        try:
            with Catalog(Store(data_dir)) as catalog:
                ((sft, prompts),) = catalog.sql("select count(*), count(distinct prompt) from release_sft").fetchall()
        finally:
            restore_env(previous)
        single = facets_build(build_config(str(tmp_path / "single")), env, tmp_path / "single.json")
    assert killer.killed, "no worker was killed mid-shard: the test proved nothing"
    assert crashed >= 1, "the killed worker's shard runs were marked Crashed, and ran again elsewhere"
    assert build_crashed == 0, "the build's own run, alive in `facets build`, beats and is never taken for dead"
    # `facets status --shards`: every shard run of the build, the crashed ones and where the others ran
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("Crashed") == crashed and "Completed" in status.stdout, status.stdout
    assert f"Completed   {len(STAGE_NAMES)} of {len(STAGE_NAMES)}" in status.stdout, "a finished run reported every stage"
    # the shard runs of the dead worker paid again at most what they had in flight
    assert stats["paid_twice"] <= len(killer.killed) * IN_FLIGHT, stats
    assert stats["max_ok_in_window"] <= RPM * 1.05, f"one 60 s window held more than the shared RPM: {stats}"
    assert spread == single, "same inputs, same release"
    assert (sft, prompts) == (48, 16)


def flow_runs(api_url: str, flow: str, tag: str | None = None) -> list:
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterTags

    async def read():
        async with PrefectClient(api_url) as client:
            tags = FlowRunFilter(tags=FlowRunFilterTags(all_=[tag])) if tag else None
            return await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                                               flow_run_filter=tags)

    return asyncio.run(read())


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_build_cancelled_from_the_server_cancels_its_shard_runs_and_a_rerun_resumes(tmp_path, postgres):
    from prefect.client.orchestration import PrefectClient
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    with S3Server() as s3, SimulatorProcess(seed=9, latency_ms=800, jitter_ms=200) as sim:
        env = worker_env(tmp_path, s3, sim)
        data_dir = f"{s3.make_bucket(f'cancel-{uuid.uuid4().hex[:8]}')}/data"
        config = build_config(data_dir, shard_deployment="build-shard/default")
        with LocalPrefect(ROOT, port=free_port(), database_url=postgres, pools=["cpu"], cpu_workers=1,
                          worker_limit=6, log_dir=tmp_path / "logs", env=env) as stack, \
                temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
            # the scheduled deployment, run as the UI runs it, then cancelled as the UI cancels it
            build = run_deployment("build-collection/incremental", parameters={"config": config}, timeout=0)
            tag = f"build:{build.id}"
            wait_for(lambda: any(r.state.is_running() for r in flow_runs(stack.api_url, "build-shard", tag)),
                     240, "a shard run is running")
            wait_for(lambda: sim.stats()["requests"] >= 10, 120, "the shard runs call the endpoint")

            async def cancel():
                async with PrefectClient(stack.api_url) as client:
                    await client.set_flow_run_state(build.id, Cancelling(message="from the UI"))

            asyncio.run(cancel())
            shards = wait_for(lambda: (runs := flow_runs(stack.api_url, "build-shard", tag))
                              and all(r.state.is_final() for r in runs) and runs, 180,
                              "every shard run of the cancelled build ended")
            # cancelled, unless it had finished before the cancel came
            states = {r.state.type.value for r in shards}
            assert "CANCELLED" in states and states <= {"CANCELLED", "COMPLETED"}, [r.state for r in shards]
            (parent,) = [r for r in flow_runs(stack.api_url, "build-collection") if r.id == build.id]
            assert parent.state.is_cancelled(), parent.state
            paid_before = sim.stats()["ok"]
            again = run_deployment("build-collection/incremental", parameters={"config": config}, timeout=600)
            assert again.state.is_completed(), again.state
        stats = sim.stats()
    assert paid_before > 0 and stats["ok"] > paid_before
    # the rerun resumed from what the cancelled build stored: only calls in flight at the cancel paid again
    assert stats["paid_twice"] <= len(shards) * IN_FLIGHT, stats
