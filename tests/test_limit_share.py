"""One endpoint's limits split across processes through the machine's Redis (DESIGN decision 15):
arrivals are counted at the simulator, in its own process."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from facets.llm.simulator import SimulatorProcess, max_in_window

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module", autouse=True)
def redis_up():
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {REDIS} ({exc}): start it with the command in DESIGN decision 15")


def test_shares_follow_the_members_as_they_join_and_leave():
    from facets.llm.limit_share import LimitShare

    key, shares = f"test-{uuid.uuid4().hex}", {"a": [], "b": []}
    a = LimitShare(REDIS, key, shares["a"].append)
    b = LimitShare(REDIS, key, shares["b"].append)
    assert b.members == 2 and shares["b"][-1] == 0.5
    assert a.beat() == 2 and shares["a"][-1] == 0.5
    b.close()
    assert a.beat() == 1 and shares["a"][-1] == 1.0
    a.close()


def test_the_split_gives_the_idle_what_they_use_and_the_busy_the_rest():
    import math

    from facets.llm.limit_share import MIN_SHARE, split

    inf = math.inf
    assert split({"a": inf, "b": inf}) == {"a": 0.5, "b": 0.5}
    approx = pytest.approx
    shares = split({"a": inf, "b": inf, "drain": 0.05})  # a shard draining its last retries
    assert shares == approx({"drain": 0.05, "a": 0.475, "b": 0.475})
    shares = split({"a": inf, "small": 0.2, "big": 0.6})  # big wants more than an even part: it shares
    assert shares == approx({"small": 0.2, "a": 0.4, "big": 0.4})
    assert split({"a": inf, "b": 0.4, "c": 0.4}) == approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert split({"a": 0.1, "b": 0.2}) == approx({"a": 0.45, "b": 0.55})  # nobody waits: the rest evenly
    assert split({"a": inf, "idle": 0.0})["idle"] == approx(MIN_SHARE)
    for wants in ({"a": 0.3, "b": inf, "c": 0.9}, {"a": 0.0, "b": 0.0}, {"a": inf}):
        assert sum(split(wants).values()) == approx(1.0)


def test_an_idle_member_leaves_its_share_to_a_busy_one():
    from facets.llm.limit_share import LimitShare

    key, shares = f"test-{uuid.uuid4().hex}", {"busy": [], "idle": []}
    reserved = {"busy": 0, "idle": 0}
    busy = LimitShare(REDIS, key, shares["busy"].append, waiting=lambda: True,
                      reserved=lambda: reserved["busy"], full_rate=10.0)
    idle = LimitShare(REDIS, key, shares["idle"].append, waiting=lambda: False,
                      reserved=lambda: reserved["idle"], full_rate=10.0)
    assert idle.share == 0.5, "a joiner counts as busy"
    idle.beat()  # a beat later it has reserved nothing: it wants nothing
    busy.beat()
    assert busy.share > 0.95 and idle.share < 0.05
    reserved["idle"] += 1000  # it calls again: it asks for what it used, and gets it at its next beat
    idle.beat()
    assert idle.share == 0.5
    busy.close()
    idle.close()


WORKER = """
import asyncio, sys
from facets.llm.gateway import Gateway
from facets.schemas.config import EndpointConfig, RateLimits, Sampling

base_url, share_via, n = sys.argv[1], sys.argv[2] or None, int(sys.argv[3])

async def main():
    config = EndpointConfig(base_url=base_url, api_key="sk-test", model="facets-sim",
                            limits=RateLimits(rpm=1200, burst_s=0.5, max_in_flight=16, share_via=share_via))
    async with Gateway(config) as gateway:
        await asyncio.gather(*(gateway.chat([{"role": "user", "content": f"q {i} {sys.argv[4]}"}], stage="s",
                                            key=str(i), sampling=Sampling(max_tokens=1000)) for i in range(n)))
    print("done", flush=True)

asyncio.run(main())
"""


def _arrivals(share_via: str, workers: int = 2, n: int = 120) -> list[float]:
    with SimulatorProcess(latency_ms=20) as sim:
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, sim.base_url, share_via, str(n), str(w)],
                                  stdout=subprocess.PIPE, text=True) for w in range(workers)]
        for proc in procs:
            out, _ = proc.communicate(timeout=120)
            assert proc.returncode == 0 and "done" in out
        stats = sim.stats(timestamps=True)
    assert stats["ok"] == workers * n
    return stats["admitted_timestamps"]


def test_two_workers_together_keep_to_one_rpm():
    # each is configured with the endpoint's 1,200 RPM (20/s); together they must not pass it
    shared = _arrivals(REDIS)
    alone = _arrivals("")
    rate = 1200 / 60
    # a window may hold the burst (0.5 s of budget) and 0.5 s of lag beyond the rate; a worker that joins
    # waits 1.5 beats from an empty bucket, and the others lower their share at their next beat
    for window in (4.0, 8.0):
        assert max_in_window(shared, window) <= rate * (window + 0.5 + 0.5), window
    assert max_in_window(alone, 4.0) > rate * (4.0 + 0.5 + 0.5), "unshared, the two would pass it: the check can fail"
    assert shared[-1] - shared[0] >= (len(shared) - 2 * rate * 0.5) / rate * 0.9


def test_an_unreachable_redis_is_refused_in_preflight_before_any_call():
    import asyncio

    from facets.llm.errors import FatalEndpointError
    from facets.llm.preflight import check_endpoint
    from facets.schemas.config import EndpointConfig, RateLimits

    config = EndpointConfig(base_url="http://127.0.0.1:9/v1", api_key="k",
                            limits=RateLimits(share_via="redis://127.0.0.1:9/0"))
    with pytest.raises(FatalEndpointError, match="no Redis answers"):
        asyncio.run(check_endpoint(config, ["m"]))
