"""One endpoint's limits shared by processes through one token bucket in the machine's Redis
(docs/ARCHITECTURE.md, decisions 14 and 15): arrivals are counted at the simulator, in its own process."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from facets.llm.limit_share import LEASE_MAX_S, SHARED_BURST
from facets.simulator.server import SimulatorProcess, max_in_window

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module", autouse=True)
def redis_up():
    import redis

    try:
        redis.Redis.from_url(REDIS, socket_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        pytest.skip(f"these tests need Redis at {REDIS}, which does not answer here ({exc})")


def _leased(rpm: float, key: str, tpm: float = 0, burst_s: float = 1.0):
    from facets.llm.limit_share import LimitLease
    from facets.llm.limiter import Limiter
    from facets.schemas.config import RateLimits

    limiter = Limiter(RateLimits(rpm=rpm, tpm=tpm, burst_s=burst_s, share_via=REDIS), leased=True)
    limiter.lease = LimitLease(REDIS, key, limiter)
    return limiter


def _alone(rpm: float):
    """A limiter of one process, sharing nothing, with a burst of one call: the rate itself."""
    from facets.llm.limiter import Limiter
    from facets.schemas.config import RateLimits

    return Limiter(RateLimits(rpm=rpm, burst_s=60 / rpm))


def _send_for(seconds: float, limiters: dict, queues: dict, queued: int = 30) -> dict[str, int]:
    """Keep `queued` calls reserved in each busy limiter (`queues`: theirs, kept from one call to the next)
    and count those that come due."""
    import time

    for name, limiter in limiters.items():
        queues.setdefault(name, [limiter.reserve(0, 0)[0] for _ in range(queued)])
    sent = dict.fromkeys(limiters, 0)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for name, limiter in limiters.items():
            queue = queues[name]
            while queue and limiter.due_in(queue[0]) == 0:
                limiter.sent(queue.pop(0))
                sent[name] += 1
                queue.append(limiter.reserve(0, 0)[0])
        time.sleep(0.01)
    return sent


def test_busy_processes_share_one_bucket_and_an_idle_one_holds_nothing():
    key = f"test-{uuid.uuid4().hex}"
    busy, idle, joiner = _leased(1200, key), _leased(1200, key), _leased(1200, key)  # 20/s
    burst, lead = 20 * SHARED_BURST, 20 * LEASE_MAX_S  # what Redis holds full, and one lease ahead of its calls
    try:
        # Beside them, in the same loop, a limiter of this process alone at the same rate (and a burst of one):
        # what the rate lets through in the time the loop really had, however busy the machine.
        queues: dict = {}
        sent = _send_for(3.0, {"busy": busy, "alone": _alone(1200)}, queues)
        assert 0.85 * sent["alone"] <= sent["busy"] <= 20 * 3 + burst + lead + 1, f"the busy one has the whole limit: {sent}"
        assert idle.lease.trips == 0 and idle.requests.level == 0, "the idle one asked for nothing and holds nothing"
        queues.pop("alone")  # a fresh one beside the next three seconds
        sent = _send_for(3.0, {"busy": busy, "joiner": joiner, "alone": _alone(1200)}, queues)
        alone = sent.pop("alone")
        assert sum(sent.values()) <= 20 * 3 + 2 * lead + 1, "together they keep to the one rate"
        assert sum(sent.values()) >= 0.85 * alone, f"together they have the whole limit: {sent}, alone {alone}"
        assert min(sent.values()) >= 0.25 * sum(sent.values()), sent
    finally:
        for limiter in (busy, idle, joiner):
            limiter.lease.close()


def test_processes_whose_calls_wait_unsent_hold_no_more_together_than_one_share():
    """Busy event loops that send late: each process may hold paid calls it has not sent, and what all
    of them hold would go out at once. However many processes take, together they hold UNSENT_ALL_S."""
    import time

    from facets.llm.limit_share import UNSENT_ALL_S, UNSENT_MAX_S

    key, rate = f"test-{uuid.uuid4().hex}", 100  # a second
    limiters = {f"p{i}": _leased(rate * 60, key) for i in range(4)}
    try:
        queues: dict = {}
        _send_for(1.0, limiters, queues)  # every one has taken, and knows how many take
        assert {limiter.lease.takers for limiter in limiters.values()} == {4}
        time.sleep(1.0)  # now none sends: what each was paid meanwhile waits
        unsent = {name: sum(limiter.due_in(r) == 0 for r in queues[name]) for name, limiter in limiters.items()}
    finally:
        for limiter in limiters.values():
            limiter.lease.close()
    assert sum(unsent.values()) <= rate * UNSENT_ALL_S + len(limiters), unsent  # a call part paid each
    assert sum(unsent.values()) < rate * UNSENT_MAX_S * len(limiters), "each alone would hold more"
    assert min(unsent.values()) >= 1, f"each still holds calls ready for its loop: {unsent}"


def test_tokens_a_process_was_given_back_return_to_redis():
    import time

    import redis

    from facets.llm.limit_share import LEASE_S

    key = f"test-{uuid.uuid4().hex}"
    limiter = _leased(600, key, tpm=60_000, burst_s=10.0)  # 1,000 tokens a second
    try:
        reservation, _ = limiter.reserve(400, 400)
        deadline = time.monotonic() + 5
        while limiter.due_in(reservation) > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert limiter.due_in(reservation) == 0
        client = redis.Redis.from_url(REDIS)
        seconds, micros = client.time()  # empty Redis's tokens now, so what comes back is not lost to its cap
        client.hset(f"facets:limit:{key}", mapping={"tokens:level": "0", "tokens:stamp": str(seconds + micros / 1e6)})
        before = float(client.hget(f"facets:limit:{key}", "tokens:level"))
        limiter.settle(reservation, 400, 10)  # the reply was short: 390 tokens come back to this process
        assert limiter.tokens.level == 390
        time.sleep(4 * LEASE_S)
        keep = limiter.tokens.full_rate * LEASE_S
        assert limiter.tokens.level == keep, "it keeps one lease's worth and gives back the rest"
        assert float(client.hget(f"facets:limit:{key}", "tokens:level")) >= before + 390 - keep - 1
    finally:
        limiter.lease.close()


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
    # a window may hold the burst (Redis holds less than the endpoint's 0.5 s) and leases taken ahead of calls
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
