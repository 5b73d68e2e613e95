"""One build per data dir: the lease on a local dir (an OS lock the kernel lets go when its holder dies)
and on S3 (moto's server: a conditional write, renewed, taken over once expired), the build flow refused
by it before any request, and two real `facets build` processes on one data dir against one simulator.
Requests are counted at the simulator and the S3 server, never in our code."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from facets.storage.lease import DataDirLocked, data_dir_lease

SOURCES = Path(__file__).parent / "data" / "sources"
NECTAR = f"nectar={SOURCES / 'nectar' / 'data.jsonl'}"
MODEL = "facets-sim"
FLOW_RUN = re.compile(r"flow run [0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

# a build's stand-in in another process: it takes the lease, says so, and holds it until it is killed
HOLDER = """
import sys, time
from facets.storage.lease import data_dir_lease
data_dir_lease(sys.argv[1], "build-collection", flow_run="run-of-the-holder", ttl_s=float(sys.argv[2])).acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold_in_child(data_dir: str, ttl_s: float = 60.0) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLDER, data_dir, str(ttl_s)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    line = child.stdout.readline()
    assert line.strip() == "held", child.stderr.read()
    return child


def kill_9(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait()


def refusal(data_dir: str, **options) -> DataDirLocked:
    with pytest.raises(DataDirLocked) as refused:
        data_dir_lease(data_dir, "build-collection", **options).acquire()
    return refused.value


# --- a local data dir ---------------------------------------------------------------------------

def test_a_second_lease_on_a_local_dir_is_refused_naming_the_holder_until_it_is_let_go(tmp_path):
    first = data_dir_lease(str(tmp_path), "build-collection", flow_run="run-a").acquire()
    refused = refusal(str(tmp_path))
    message = str(refused)
    assert "\n" not in message
    assert f"build-collection on {socket.gethostname()} (pid {os.getpid()}, flow run run-a) since " in message
    assert refused.owner.flow_run == "run-a" and refused.owner.since.endswith("Z")
    first.release()
    with data_dir_lease(str(tmp_path), "build-bench") as second:
        assert "build-bench" in str(refusal(str(tmp_path)))
    assert second.held is False
    data_dir_lease(str(tmp_path), "build-collection").acquire().release()


def test_a_local_lease_is_free_the_moment_its_holder_is_killed_with_sigkill(tmp_path):
    child = hold_in_child(str(tmp_path))
    try:
        refused = refusal(str(tmp_path))
        assert f"pid {child.pid}, flow run run-of-the-holder" in str(refused)
        started = time.monotonic()
        refused = refusal(str(tmp_path), wait=True, timeout_s=0.6)
        assert time.monotonic() - started >= 0.6 and "(waited 1 s)" in str(refused)
        waiter = data_dir_lease(str(tmp_path), "build-collection", wait=True, timeout_s=30)
        taken = threading.Thread(target=waiter.acquire)
        taken.start()
        time.sleep(0.7)
        assert not waiter.held, "a waiter does not get a lease that is held"
    finally:
        kill_9(child)
    taken.join(10)
    assert waiter.held, "the kernel let the lock go with the killed process"
    waiter.release()


# --- an s3:// data dir (moto's server) ---------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    from facets.testing.s3_server import S3Server, apply_env, restore_env

    with S3Server() as server:
        previous = apply_env(server)
        try:
            yield server
        finally:
            restore_env(previous)


def lease_requests(s3, bucket: str) -> list[tuple[str, int]]:
    return [(method, status) for method, path, status in s3.log() if path.startswith(f"/{bucket}/data/locks/")]


def test_a_live_lease_on_s3_is_refused_and_renewed_and_once_expired_it_is_taken_over(s3):
    data_dir = f"{s3.make_bucket('lease-expiry')}/data"
    child = hold_in_child(data_dir, ttl_s=2)
    try:
        assert "pid {}, flow run run-of-the-holder".format(child.pid) in str(refusal(data_dir))
        time.sleep(3)  # past the first expiry: the holder's thread has renewed it
        assert "run-of-the-holder" in str(refusal(data_dir)), "a live holder renews its lease"
    finally:
        kill_9(child)
    assert "run-of-the-holder" in str(refusal(data_dir)), "a dead holder's lease stands until it expires"
    before = len(lease_requests(s3, "lease-expiry"))
    with data_dir_lease(data_dir, "build-collection", flow_run="run-b", wait=True, timeout_s=30) as taken:
        tries = lease_requests(s3, "lease-expiry")[before:]
        assert "run-b" in str(refusal(data_dir))
    # Each try opens with a create that the store refuses while the lease is there; the dead holder's lease
    # expired at most a TTL (2 s) after its last renewal, so the try one poll (2 s) after the first finds it
    # expired and replaces it. A busy machine only makes the tries later, never more.
    assert taken.held is False and 1 <= tries.count(("PUT", 412)) <= 2, f"taken over within the TTL and a poll: {tries}"
    assert ("PUT", 200) in tries, "the expired lease was replaced"
    data_dir_lease(data_dir, "build-collection").acquire().release()
    requests = lease_requests(s3, "lease-expiry")
    assert ("PUT", 412) in requests, "the store refused a create of an existing lease (If-None-Match)"
    assert requests[-1] == ("DELETE", 204)


def test_of_builds_starting_at_once_on_s3_exactly_one_gets_a_fresh_or_an_expired_lease(s3):
    data_dir = f"{s3.make_bucket('lease-race')}/data"

    def race() -> list:
        leases = [data_dir_lease(data_dir, "build-collection", flow_run=f"run-{i}", ttl_s=1) for i in range(4)]
        barrier = threading.Barrier(len(leases))

        def take(lease) -> None:
            barrier.wait()
            try:
                lease.acquire()
            except DataDirLocked:
                pass

        threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return [lease for lease in leases if lease.held]

    (winner,) = race()
    winner._stop.set()  # the holder freezes: no more renewals, no release
    winner._heartbeat.join()
    time.sleep(1.5)
    (taker,) = race()
    assert taker.owner.token != winner.owner.token
    taker.release()
    winner.release()  # finds the lease gone: deletes nothing of another's
    data_dir_lease(data_dir, "build-collection").acquire().release()


# --- the build flow and the CLI -----------------------------------------------------------------

def test_the_build_flow_is_refused_before_any_request_while_another_build_holds_the_data_dir(tmp_path, prefect_server):
    from facets.flows.build import build_collection
    from facets.simulator.server import run_simulator
    from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits

    with run_simulator(seed=1) as sim, data_dir_lease(str(tmp_path), "build-collection", flow_run="the-first"):
        endpoint = EndpointConfig(base_url=sim.base_url, api_key="sk-test", model=MODEL, limits=RateLimits(rpm=60_000))
        config = BuildConfig(sources=[NECTAR], limit=2, data_dir=str(tmp_path), endpoint=endpoint, publish=False)
        with pytest.raises(DataDirLocked, match="flow run the-first"):
            asyncio.run(build_collection(config))
        waiting = config.model_copy(update={"wait_for_lock": True, "lock_wait_s": 1.0})
        with pytest.raises(DataDirLocked, match=r"\(waited 1 s\)"):
            asyncio.run(build_collection(waiting))
        assert sim.stats()["requests"] == 0
    assert not (tmp_path / "stages").exists(), "nothing was ingested"


@pytest.mark.slow
def test_two_facets_builds_on_one_data_dir_the_second_is_refused_in_one_line_and_one_with_wait_follows(
        tmp_path, prefect_server):
    from facets.simulator.server import SimulatorProcess

    # one request at a time, 0.7 s each: the first build pays for ~35 of them, long enough for two more
    # processes to start while it runs
    with SimulatorProcess(seed=4, latency_ms=700) as sim:
        env = {**os.environ, "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test",
               "PREFECT_API_URL": prefect_server}
        command = [sys.executable, "-m", "facets.flows.cli", "build", "--source", NECTAR, "--limit", "4",
                   "--shard-size", "2", "--data-dir", str(tmp_path / "data"), "--model", MODEL, "--rpm", "60000",
                   "--max-in-flight", "1", "--no-publish", "--quiet"]
        first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        refused = waiting = None
        try:
            deadline = time.monotonic() + 120
            while sim.stats()["requests"] == 0 and first.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert first.poll() is None, "the first build ended before it paid for anything"
            refused = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            waiting = subprocess.Popen(command + ["--wait"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
            started = time.monotonic()
            refused_out, refused_err = refused.communicate(timeout=180)
            refused_s = time.monotonic() - started
            assert first.poll() is None, "the first build was still running when the second was refused"
            first_out, first_err = first.communicate(timeout=300)
            waiting_out, waiting_err = waiting.communicate(timeout=300)
        finally:
            for process in (first, refused, waiting):
                if process is not None and process.poll() is None:
                    process.kill()
        stats = sim.stats()
    assert refused.returncode == 2, refused_err[-3000:]
    ours = [line for line in refused_err.splitlines() if line.startswith("facets build:")]
    assert len(ours) == 1 and "Traceback" not in refused_err, refused_err
    assert f"build-collection on {socket.gethostname()} (pid {first.pid}, " in ours[0] and " since " in ours[0]
    assert FLOW_RUN.search(ours[0]), ours[0]
    assert "accepted" not in refused_out
    assert first.returncode == 0 and "accepted 4 of 4" in first_out, first_err[-3000:]
    assert waiting.returncode == 0 and "accepted 4 of 4" in waiting_out, waiting_err[-3000:]
    assert f"(pid {first.pid}, " in waiting_err and "waiting for" in waiting_err, "the third build waited"
    assert stats["paid_twice"] == 0 and stats["requests"] == stats["distinct_request_hashes"]
    print(f"refused in {refused_s:.1f} s (process start included); the first build made {stats['requests']} requests")
