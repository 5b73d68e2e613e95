"""The gateway against the loopback simulator: real HTTP, the real openai client and our lean transport.

Nothing of ours is mocked. Every claim is checked from the endpoint's side (`/stats`): what was sent,
refused, faulted and paid for, so a gateway that re-pays, hammers or overspends cannot pass by
counting itself. Most tests run once per transport.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from pydantic import BaseModel, Field

from facets.llm import limiter as limiter_module
from facets.llm.batch import BatchItem, BatchRunner
from facets.llm.errors import (
    BudgetExceeded,
    EndpointUnreachable,
    FatalEndpointError,
    MissingCredentials,
    RunAborted,
    TooManyFailures,
)
from facets.llm.gateway import Completion, Gateway, endpoint_transport
from facets.llm.journal import Journal
from facets.llm.simulator import SimulatorProcess, max_in_window, run_simulator
from facets.schemas.config import EndpointConfig, RateLimits, Retries, Sampling

MODEL = "facets-sim"
TRANSPORTS = ["lean", "openai"]
# Fast backoff so a test never waits on our own timers; Retry-After still sets the pace on a 429.
RETRIES = Retries(max_attempts=6, timeout_s=10.0, deadline_s=60.0, backoff_initial_s=0.01, backoff_max_s=0.05)
UNLIMITED = RateLimits(rpm=0, max_in_flight=32)
SAMPLING = Sampling(max_tokens=1000, seed=1)
PRICE = 1000.0  # USD per 1M tokens: a tenth of a cent a token, so a few calls reach a small cap


class Verdict(BaseModel):
    title: str
    summary: str
    score: int = Field(ge=1, le=5)


def substantive(verdict: Verdict) -> None:
    """A caller's validator: schema-valid but empty or filler text is not a row."""
    if len(verdict.summary.split()) < 3 or not verdict.title.strip("n/a "):
        raise ValueError("title and summary must say something")


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def fresh_limiters():
    # Limiters are per (endpoint, model) for the life of a process; a later simulator may get an earlier
    # one's port, and must not inherit its pauses and cut rates.
    limiter_module._SHARED.clear()
    yield
    limiter_module._SHARED.clear()


def endpoint(sim, transport: str = "lean", **fields) -> EndpointConfig:
    return EndpointConfig(**{
        "base_url": sim.base_url, "api_key": "sk-test", "model": MODEL, "transport": transport,
        "limits": UNLIMITED, "retries": RETRIES, **fields,
    })


def ask(i: int) -> list[dict]:
    return [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": f"Question {i}: why do tides happen?"}]


async def parse_all(gateway: Gateway, n: int, *, concurrent: bool = True, **options):
    """n structured calls; exceptions are returned in place (concurrent) so each can be checked."""
    options = {"sampling": SAMPLING, "check": substantive, **options}
    calls = (gateway.parse(ask(i), Verdict, stage="test", key=f"k{i}", **options) for i in range(n))
    if concurrent:
        return await asyncio.gather(*calls, return_exceptions=True)
    return [await call for call in calls]  # one after another: an exception stops the rest


def answered(results) -> bool:
    """Every call came back with a result (not None, not an exception)."""
    return all(isinstance(r, Completion) for r in results)


def run(config: EndpointConfig, body, journal: Journal | None = None):
    """`await body(gateway)` in a fresh event loop with a fresh gateway; returns (result, gateway)."""

    async def main():
        async with Gateway(config, journal) as gateway:
            return await body(gateway), gateway

    return asyncio.run(main())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- rate limits ------------------------------------------------------------------------------


def test_retry_after_is_waited_out_so_each_call_meets_at_most_one_429(transport):
    # The endpoint admits one request per 100 ms. Back-to-back calls each hit its limit once; a client that
    # waits out Retry-After gets through on its next try, one that retried on its own 10-50 ms backoff
    # would collect several 429s per call.
    n = 8
    with run_simulator(rpm=600, burst_s=0.1) as sim:
        results, gateway = run(endpoint(sim, transport), lambda g: parse_all(g, n, concurrent=False))
        stats = sim.stats()
    assert answered(results) and stats["ok"] == n and stats["paid_twice"] == 0
    assert 2 <= stats["rate_limited"] <= n - 1
    assert stats["requests"] == n + stats["rate_limited"]
    assert gateway.usage.rate_limited == gateway.usage.retries == stats["rate_limited"]


def test_429_storm_every_call_succeeds_and_the_rate_recovers(transport):
    # Our limiter is set to the endpoint's RPM but allows a 10-request burst where the endpoint allows 1:
    # the first burst is a storm of 429s. Honouring Retry-After and cutting the rate once per storm (not
    # once per 429) finishes close to the endpoint's own pace (16 calls at 10/s).
    n = 16
    with run_simulator(rpm=600, burst_s=0.1) as sim:
        config = endpoint(sim, transport, limits=RateLimits(rpm=600, max_in_flight=32),
                          retries=RETRIES.model_copy(update={"max_attempts": 20}))
        started = time.monotonic()
        results, gateway = run(config, lambda g: parse_all(g, n))
        elapsed = time.monotonic() - started
        stats = sim.stats()
    assert answered(results)
    assert stats["ok"] == n and stats["paid_twice"] == 0 and gateway.failures == []
    assert 5 <= stats["rate_limited"] <= 2 * n  # a storm, but no thundering herd of retries
    assert gateway.usage.rate_limited == stats["rate_limited"]
    assert elapsed < 15, f"the rate did not recover after the storm: {elapsed:.1f}s"  # 27 s when each 429 cut it


async def longest_stall(stalls: list[float], tick_s: float = 0.01) -> None:
    """Record how late this event loop wakes a sleeper, until cancelled: the loop's own stalls."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(tick_s)
        stalls.append(loop.time() - asked - tick_s)


def test_limiter_never_exceeds_its_rpm_in_any_window(transport):
    # The endpoint is unlimited, so only our limiter paces: 1,200 RPM (20/s) with a 0.5 s burst (10).
    # Any window of w seconds may hold at most burst + 20 * w arrivals, as counted by the endpoint (in its
    # own process, so its arrival clock does not share our GIL). The limiter sets when a request may
    # leave; it arrives later by the loop's wake-up grid, new connections of a burst and any stall of a
    # busy machine, which bunches it with the ones after. So the bound allows 0.15 s of lag plus twice the
    # longest stall measured in our loop (the endpoint's process stalls too). One call goes first so the
    # openai SDK's one-off set-up is not counted. Unpaced, all 60 calls would land in the first quarter second.
    rpm, burst_s, n = 1200, 0.5, 60
    stalls: list[float] = []

    async def body(gateway):
        await gateway.chat(ask(-1), stage="warm-up", key="w", sampling=SAMPLING)
        watch = asyncio.create_task(longest_stall(stalls))
        started = time.monotonic()
        results = await parse_all(gateway, n)
        elapsed = time.monotonic() - started
        watch.cancel()
        return results, elapsed

    with SimulatorProcess() as sim:
        config = endpoint(sim, transport, limits=RateLimits(rpm=rpm, burst_s=burst_s, max_in_flight=64))
        (results, elapsed), _ = run(config, body)
        stats = sim.stats(timestamps=True)
    assert answered(results) and stats["ok"] == n + 1
    arrivals = stats["admitted_timestamps"][1:]
    lag_s = 0.15 + 2 * max(stalls)
    for window in (0.25, 0.5, 1.0, 2.0):
        most = max_in_window(arrivals, window)
        assert most <= rpm / 60 * (burst_s + window + lag_s), (window, most, lag_s)
    assert elapsed >= (n - rpm / 60 * burst_s) / (rpm / 60) * 0.95


def test_server_headers_never_erase_the_tokens_of_replies_still_being_written():
    """The server charges output when it replies, so its remaining budget leaves out our unanswered calls."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=0, tpm=60_000, burst_s=1.0), clock=lambda: clock[0])
    first, _ = limiter.reserve(100, 400)
    second, _ = limiter.reserve(100, 400)  # both sent; the server has charged their inputs only
    assert limiter.tokens.level == 1000 - 1000
    # the first reply: the server has charged 200 input + 400 output; it says 400 remain
    limiter.observe_headers({"x-ratelimit-remaining-tokens": "400"}, first)
    assert limiter.tokens.level == 0, "the second call's 400 output tokens are still owed"
    limiter.settle(first, 100, 400)
    limiter.settle(second, 100, 100)  # it wrote less than reserved: the difference comes back
    assert limiter.tokens.level == 300 and limiter.outstanding_output == 0


def test_a_queued_calls_wait_follows_its_place_when_the_calls_ahead_change():
    """A call waits for the bucket to refill up to its place, not for a time fixed when it reserved: a
    reply longer than reserved pushes the queue back, a call withdrawn before it was sent moves it up."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=0, tpm=60_000, burst_s=1.0), clock=lambda: clock[0])
    first, wait = limiter.reserve(500, 500)  # 1,000 tokens a second, a full bucket of 1,000
    assert wait == 0
    second, wait = limiter.reserve(250, 250)
    assert wait == pytest.approx(0.5)
    third, wait = limiter.reserve(250, 250)
    assert wait == pytest.approx(1.0)
    limiter.settle(first, 500, 1000)  # the first reply wrote 500 more than it reserved
    assert limiter.due_in(second) == pytest.approx(1.0) and limiter.due_in(third) == pytest.approx(1.5)
    limiter.withdraw(second)  # cancelled before it was sent: the third takes its place
    assert limiter.due_in(third) == pytest.approx(1.0)
    clock[0] = 1.0
    assert limiter.due_in(third) == 0


def test_calls_queued_through_a_pause_go_out_at_the_rate_after_it_not_at_once():
    """A pause (429s) holds the buckets' refill: the queue behind it resumes at the rate when it ends,
    instead of every call that fell due meanwhile going out together into the same limit."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), clock=lambda: clock[0])  # 10/s, burst 10
    for _ in range(10):
        limiter.reserve(0, 0)  # the burst goes out
    queued = [limiter.reserve(0, 0)[0] for _ in range(20)]  # due at 0.1, 0.2, ... 2.0 s
    limiter.rate_limited(retry_after=1.0)  # a 429 at 0 s, with Retry-After 1 s
    clock[0] = 1.0
    assert [round(limiter.due_in(r), 6) for r in queued[:3]] == [0.1, 0.2, 0.3], "not ten at once at 1 s"
    clock[0] = 1.25
    assert sum(limiter.due_in(r) == 0 for r in queued) == 2


def test_a_paused_leased_limiter_takes_nothing_from_the_shared_bucket():
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), clock=lambda: clock[0], leased=True)
    limiter.reserve(0, 0)
    assert limiter.owed(0.1, 0.1) == {"requests": 1.0}
    limiter.rate_limited(retry_after=2.0)
    assert limiter.owed(0.1, 0.1) == {"requests": 0.0}, "what it took now would all go out when the pause ends"
    assert limiter.factor == 1.0, "a dearer request would throw the shared budget away"
    clock[0] = 2.5
    assert limiter.owed(0.1, 0.1)["requests"] > 0


def test_a_leased_limiter_brakes_when_the_endpoint_says_it_is_nearly_empty():
    """Other processes' late sends drained the endpoint: hold sends (and leases) until it has refilled as
    much as Redis can hand out at once, rather than have every early call refused and its request burnt;
    no longer, or the brake would cost budget (Redis's bucket full, its refill lost)."""
    clock = [0.0]
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), clock=lambda: clock[0], leased=True)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "5"})  # half a second of the rate: go on
    assert limiter.pause_remaining() == 0
    limiter.reserve(0, 0)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"})
    assert limiter.pause_remaining() == pytest.approx(limiter_module.SHARED_BURST)  # 5 requests at 10 a second
    assert limiter.owed(0.1, 0.1) == {"requests": 0.0}
    clock[0] = 0.6
    assert limiter.pause_remaining() == 0 and limiter.owed(0.1, 0.1) == {"requests": 1.0}


def test_a_call_under_a_shared_limit_goes_as_soon_as_a_lease_pays_for_it_not_when_its_guess_ends():
    """A paid call asleep until its guessed wait ends holds budget that no process uses (and a process
    may hold only its part paid and unsent): the lease thread that pays it wakes it, once."""
    import threading

    from facets.llm.gateway import _until_paid

    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), leased=True)
    first, _ = limiter.reserve(0, 0)
    second, _ = limiter.reserve(0, 0)
    woken = []
    assert limiter.wake_when_paid(second, lambda: woken.append("second"))
    limiter.credit({"requests": 1.5}, 0.1, {"requests": 1.5})
    assert woken == [], "the first call is paid, the second only half"
    limiter.credit({"requests": 0.5}, 0.1, {"requests": 0.5})
    limiter.credit({"requests": 1.0}, 0.1, {"requests": 1.0})
    assert woken == ["second"], "woken once, when paid in full"
    assert not limiter.wake_when_paid(first, lambda: woken.append("first")), "paid already: nothing to wait for"

    async def wait_for_a_lease() -> float:
        fresh = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), leased=True)
        call, _ = fresh.reserve(0, 0)
        pay = threading.Timer(0.2, fresh.credit, ({"requests": 1.0}, 0.1, {"requests": 1.0}))
        started = time.monotonic()
        pay.start()
        await _until_paid(fresh, call, wait=5.0)
        assert fresh.due_in(call) == 0
        return time.monotonic() - started

    assert asyncio.run(wait_for_a_lease()) < 1.0, "it slept its whole guess"


def test_a_gateway_under_a_shared_limit_brakes_on_the_endpoints_headers(redis_url):
    """Through the real endpoint: another client drains the simulator's bucket; the next reply a process
    under a shared limit gets says so, and the process holds its sends."""
    import uuid

    with run_simulator(rpm=60, burst_s=10.0) as sim:  # a bucket of 10 requests, refilled at 1 a second
        async def drain(gateway):
            return await parse_all(gateway, 10)

        drained, _ = run(endpoint(sim), drain)
        assert answered(drained) and sim.stats()["rate_limited"] == 0
        shared = RateLimits(rpm=60, burst_s=10.0, share_via=redis_url)
        key = f"brake-{uuid.uuid4().hex}"
        limiter_module._SHARED.clear()

        async def one(gateway):
            limiter = limiter_module.shared_limiter(gateway.url, MODEL, gateway.endpoint.limits)
            await gateway.parse(ask(0), Verdict, stage="test", key=key, sampling=SAMPLING, check=substantive)
            return limiter.pause_remaining()

        held, _ = run(endpoint(sim, limits=shared), one)
        # empty: it holds until the endpoint has refilled what Redis holds full (5 s at 1 request a second)
        assert held > 3.0, "the reply said the endpoint was nearly empty: sends wait for it to refill"


def test_a_leased_limiter_takes_no_more_than_it_sends():
    """Calls paid for but not sent (an event loop busy elsewhere) stop the leases: what a process saved
    while it could not send would otherwise go out at once later, past the endpoint's burst."""
    limiter = limiter_module.Limiter(RateLimits(rpm=600, burst_s=1.0), leased=True)  # 10/s: 1 in 0.1 s
    queued = [limiter.reserve(0, 0)[0] for _ in range(5)]
    assert limiter.owed(0.1, 0.3) == {"requests": 3.0}, "0.3 s of the rate, though it owes 5"
    limiter.credit({"requests": 3.0}, 0.1, {"requests": 3.0})
    assert [limiter.due_in(r) == 0 for r in queued] == [True, True, True, False, False]
    assert limiter.owed(0.1, 0.3) == {"requests": 0.0}, "three paid, none sent"
    limiter.sent(queued[0])
    limiter.sent(queued[1])
    assert limiter.owed(0.1, 0.3) == {"requests": 2.0}
    limiter.withdraw(queued[4])  # cancelled while it waited: it neither waits nor owes
    assert limiter.owed(0.1, 0.3) == {"requests": 1.0}


def test_a_call_paid_in_fractions_with_float_dust_goes_and_does_not_wait_for_a_lease_never_asked():
    """At 300 RPM a process holds at most 0.75 of a request paid and unsent, so leases pay a call in parts;
    ten tenths leave it 1e-16 short. It must count as paid both for going and for leasing: counted paid
    by one and short by the other, it waited for a payment that was never asked for (a build hung)."""
    limiter = limiter_module.Limiter(RateLimits(rpm=300, burst_s=1.0), leased=True)
    call, _ = limiter.reserve(0, 0)
    for _ in range(10):
        limiter.credit({"requests": 0.1}, 0.1, {"requests": 0.1})
    assert limiter.requests.level < 0, "the dust this test is about"
    assert limiter.due_in(call) == 0
    limiter.sent(call)
    assert limiter.owed(0.1, 0.15) == {"requests": 0.0}
    second, _ = limiter.reserve(0, 0)
    assert limiter.due_in(second) > 0 and limiter.owed(0.1, 0.15)["requests"] > 0.5, "the next call is asked for"


def test_a_leased_bucket_takes_no_more_while_its_calls_wait_for_another():
    """Calls held back by the token bucket keep the requests they were paid: the request bucket takes no
    more (else, when the tokens came, they would all go at once), while the token bucket goes on taking."""
    limiter = limiter_module.Limiter(RateLimits(rpm=600, tpm=6000, burst_s=1.0), leased=True)  # 10 and 100 a second
    queued = [limiter.reserve(50, 50)[0] for _ in range(5)]
    assert limiter.owed(0.1, 0.3) == {"requests": 3.0, "tokens": 30.0}
    limiter.credit({"requests": 3.0, "tokens": 30.0}, 0.1, {"requests": 3.0, "tokens": 30.0})
    assert limiter.due_in(queued[0]) > 0, "its 100 tokens are not all paid yet"
    assert limiter.owed(0.1, 0.3) == {"requests": 0.0, "tokens": 30.0}


def test_only_calls_near_the_front_hold_a_reservation(transport):
    """1,000 queued calls reserve a few at a time, so a first guess at reply length paces a few, not all."""
    in_flight, n = 4, 200
    seen: list[float] = []

    async def body(gateway):
        limiter = limiter_module.shared_limiter(gateway.url, MODEL, gateway.endpoint.limits)

        async def watch():
            while True:
                seen.append(limiter.outstanding_output)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        results = await parse_all(gateway, n)
        watcher.cancel()
        return results

    with run_simulator(latency_ms=20) as sim:
        limits = RateLimits(rpm=60_000, tpm=60_000_000, max_in_flight=in_flight)
        results, gateway = run(endpoint(sim, transport, limits=limits), body)
    assert answered(results)
    # each call reserves at most max_tokens (1,000) of output; 2 x in_flight calls reserve at once
    assert max(seen) <= 2 * in_flight * SAMPLING.max_tokens
    assert max(seen) > 0


def test_in_flight_follows_the_rpm_and_the_latency_unless_it_is_set():
    from facets.llm.slots import ADAPTIVE_MAX, CallSlots

    adaptive = CallSlots(RateLimits(rpm=12_000))  # 200/s
    for _ in range(200):
        adaptive.observe(0.5)
    assert adaptive.in_flight.size == 150 and adaptive.reserving.size == 300  # 200/s x 0.5 s x 1.5
    fixed = CallSlots(RateLimits(rpm=12_000, max_in_flight=64))
    fixed.observe(0.5)
    assert fixed.in_flight.size == 64
    huge = CallSlots(RateLimits(rpm=1_000_000))
    huge.observe(30.0)
    assert huge.in_flight.size == ADAPTIVE_MAX


def test_a_waiter_cancelled_just_before_a_slot_is_freed_is_cancelled_and_takes_nothing():
    """The freed slot skips the cancelled waiter: the waiter then finds its entry gone, and must still end
    cancelled (a timeout around it turns that into TimeoutError), not with a ValueError of its own."""
    from facets.llm.slots import Slots

    async def main():
        slots = Slots(1)
        await slots.acquire()
        waiting = asyncio.create_task(slots.acquire())
        await asyncio.sleep(0)
        waiting.cancel()
        slots.release()  # before the cancelled waiter runs again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert slots.used == 0 and not slots._waiters

    asyncio.run(main())


def test_slots_grow_to_let_waiters_in_and_a_cancelled_waiter_gives_its_slot_on():
    from facets.llm.slots import Slots

    async def main():
        slots = Slots(1)
        await slots.acquire()
        waiting = [asyncio.create_task(slots.acquire()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(t.done() for t in waiting)
        slots.resize(3)  # two more may go
        await asyncio.sleep(0)
        assert [t.done() for t in waiting] == [True, True, False]
        waiting[2].cancel()
        await asyncio.gather(waiting[2], return_exceptions=True)
        slots.release()
        assert slots.used == 2 and not slots._waiters

    asyncio.run(main())


def test_slots_serve_waiters_by_priority_then_in_arrival_order():
    from facets.llm.slots import Slots

    async def main():
        slots = Slots(1)
        await slots.acquire()
        order = []

        async def wait(name: str, priority: int) -> None:
            async with slots.slot(priority):
                order.append(name)

        waiting = [asyncio.create_task(wait(name, priority))
                   for name, priority in (("tree-1", 0), ("response-1", 2), ("tree-2", 0), ("system-1", 1),
                                          ("response-2", 2))]
        await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*waiting)
        assert order == ["response-1", "response-2", "system-1", "tree-1", "tree-2"]
        assert slots.used == 0 and not slots._waiters

    asyncio.run(main())


def test_gateways_of_one_run_share_one_connection_per_call_in_flight():
    """A build's stages share their call slots and one transport: however the stages take turns, the
    endpoint sees no more connections than calls in flight, and a stage closing leaves the others theirs."""
    from facets.llm.slots import CallSlots

    with run_simulator(latency_ms=20) as sim:
        config = endpoint(sim, limits=RateLimits(rpm=0, max_in_flight=4))

        async def main():
            slots, transport = CallSlots(config.limits), endpoint_transport(config)
            stages = [Gateway(config, slots=slots, priority=p, transport=transport) for p in range(3)]
            results = []
            for gateway in stages:  # one after another, as a shard's stages finish
                results += await parse_all(gateway, 12)
                await gateway.aclose()
            await transport.close()
            return results

        results = asyncio.run(main())
        stats = sim.stats()
    assert answered(results) and stats["ok"] == 36
    assert stats["connections"] <= 4


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["http_500", "http_503", "drop", "hang", "truncated_json", "invalid_json", "off_spec", "length"])
def test_each_fault_kind_is_recovered(transport, kind):
    # A quarter of arrivals fault. Transport faults are retried; content faults (bad JSON, schema-valid
    # filler, a reply cut by max_tokens) are asked again with the error. Either way every call ends with one
    # clean reply, and each fault costs exactly one more request.
    n = 16
    with run_simulator(faults={kind: 0.25}, hang_s=5.0, seed=3) as sim:
        # A hang outlasts a short client timeout; the others keep the long one, so a slow reply on a busy
        # machine is not mistaken for a fault.
        config = endpoint(sim, transport, retries=RETRIES.model_copy(update={"timeout_s": 1.0 if kind == "hang" else 10.0}))
        results, gateway = run(config, lambda g: parse_all(g, n, repair_attempts=4))
        stats = sim.stats()
    assert answered(results), gateway.failures
    assert all(isinstance(r.value, Verdict) and substantive(r.value) is None for r in results)
    assert stats["faults"][kind] >= 1 and sum(stats["faults"].values()) == stats["faults"][kind]
    assert stats["ok"] == n and stats["requests"] == n + stats["faults"][kind]
    assert gateway.failures == []


def test_structured_output_repair_loop_exhausted_records_a_failure_and_never_raises(transport, tmp_path):
    with run_simulator(faults={"truncated_json": 1.0}) as sim:
        journal = Journal(str(tmp_path))
        result, gateway = run(endpoint(sim, transport),
                              lambda g: g.parse(ask(0), Verdict, stage="trees", key="i0#0", sampling=SAMPLING, repair_attempts=2),
                              journal)
        stats = sim.stats()
    assert result is None
    assert stats["requests"] == 3 and stats["faults"]["truncated_json"] == 3  # asked, then asked again twice
    [failure] = gateway.failures
    assert (failure.stage, failure.key, failure.reason) == ("trees", "i0#0", "invalid_json")
    assert failure.raw_output.startswith("{") and failure.detail
    journal = Journal(str(tmp_path))  # every paid reply is kept, marked rejected: none is a row
    assert len(journal) == 3 and journal.get(gateway.prepare(ask(0), SAMPLING, schema=Verdict).key).rejected == "invalid_json"


def test_repair_asks_again_with_the_error_then_accepts(transport, tmp_path):
    # Schema-invalid replies half the time: each is answered by a repair turn carrying the validation error.
    n = 12
    with run_simulator(faults={"invalid_json": 0.5}, seed=1) as sim:
        results, gateway = run(endpoint(sim, transport), lambda g: parse_all(g, n, repair_attempts=6), Journal(str(tmp_path)))
        stats = sim.stats()
        sim.reset_stats()  # a rerun walks each call's attempts from the journal: the rejected replies too
        again, _ = run(endpoint(sim, transport), lambda g: parse_all(g, n, repair_attempts=6), Journal(str(tmp_path)))
        assert sim.stats()["requests"] == 0
    assert answered(results) and gateway.failures == []
    assert stats["faults"]["invalid_json"] >= 3 and stats["requests"] == n + stats["faults"]["invalid_json"]
    assert [r.value for r in again] == [r.value for r in results] and all(r.from_journal for r in again)


def test_reply_cut_by_max_tokens_is_a_failure_not_a_row(transport, tmp_path):
    with run_simulator(response_tokens=200) as sim:
        result, gateway = run(
            endpoint(sim, transport),
            lambda g: g.chat(ask(0), stage="responses", key="r0", sampling=Sampling(max_tokens=8), repair_attempts=1),
            Journal(str(tmp_path)),
        )
        stats = sim.stats()
    assert result is None and stats["requests"] == stats["paid"] == 2  # asked once more, "shorter"
    [failure] = gateway.failures
    assert failure.reason == "length" and failure.raw_output and "max_tokens=8" in failure.detail
    assert len(Journal(str(tmp_path))) == 2  # both replies kept, neither a row


# -- fatal conditions -------------------------------------------------------------------------


def test_bad_key_stops_at_the_first_call(transport):
    with run_simulator(api_key="sk-right") as sim:
        config = endpoint(sim, transport, api_key="sk-wrong")
        with pytest.raises(FatalEndpointError) as caught:
            run(config, lambda g: parse_all(g, 20, concurrent=False))
        assert sim.stats()["requests"] == 1 and sim.stats()["errors"] == {"401": 1}
        assert "401" in str(caught.value) and "OPENAI_API_KEY" in str(caught.value)

        # Concurrent calls: those already in flight get their 401, every later one stops without a request.
        sim.reset_stats()
        results, _ = run(endpoint(sim, transport, api_key="sk-wrong", limits=RateLimits(rpm=0, max_in_flight=4)),
                         lambda g: parse_all(g, 50))
        assert all(isinstance(r, FatalEndpointError) for r in results)
        assert sim.stats()["requests"] <= 4


def test_unknown_model_stops_at_the_first_call(transport):
    with run_simulator(models=MODEL) as sim:
        with pytest.raises(FatalEndpointError) as caught:
            run(endpoint(sim, transport, model="gpt-nonexistent"), lambda g: parse_all(g, 20, concurrent=False))
        stats = sim.stats()
    assert stats["requests"] == 1 and stats["errors"] == {"404": 1}
    assert "404" in str(caught.value) and "gpt-nonexistent" in str(caught.value)


def test_no_key_and_no_base_url_names_the_variable_and_the_simulator(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(MissingCredentials) as caught:
        Gateway(EndpointConfig())
    assert "OPENAI_API_KEY" in str(caught.value) and "facets simulate" in str(caught.value)


def test_unreachable_endpoint_fails_after_bounded_retries(transport):
    url = f"http://127.0.0.1:{closed_port()}/v1"
    config = EndpointConfig(base_url=url, api_key="sk-test", model=MODEL, transport=transport, limits=UNLIMITED,
                            retries=RETRIES.model_copy(update={"max_attempts": 3, "timeout_s": 1.0}))
    started = time.monotonic()
    with pytest.raises(EndpointUnreachable) as caught:
        asyncio.run(_parse_one(config))
    assert time.monotonic() - started < 5
    assert url in str(caught.value) and "3 attempts" in str(caught.value) and "OPENAI_BASE_URL" in str(caught.value)


async def _parse_one(config: EndpointConfig):
    async with Gateway(config) as gateway:
        return await gateway.parse(ask(0), Verdict, stage="test", key="k0", sampling=SAMPLING)


# -- spend ------------------------------------------------------------------------------------


def test_budget_cap_is_never_overspent_and_stops_the_run(transport):
    # Each call holds its worst case (~$0.3: 200 output tokens and its input) while in flight; replies cost
    # far less. Eight calls at a time never overspend the $1 cap, yet the run stops only once the next call
    # really could, not when the worst cases in flight add up to the cap.
    cap, max_tokens = 1.0, 200
    with run_simulator(response_tokens=30) as sim:
        config = endpoint(sim, transport, max_cost=cap, prices={MODEL: (PRICE, PRICE, PRICE)},
                          limits=RateLimits(rpm=0, max_in_flight=8))
        results, gateway = run(config, lambda g: parse_all(g, 200, sampling=Sampling(max_tokens=max_tokens)))
        stats = sim.stats()
    spent_at_endpoint = (stats["prompt_tokens"] + stats["completion_tokens"]) * PRICE / 1e6
    stopped = [r for r in results if isinstance(r, BudgetExceeded)]
    assert stopped and "max_cost" in str(stopped[0])
    assert spent_at_endpoint <= cap
    # It did not stop early: the worst case held per call is max_tokens of output plus its input estimate.
    assert spent_at_endpoint > cap - 2 * max_tokens * PRICE / 1e6
    assert gateway.usage.summary()["cost_usd"] == pytest.approx(spent_at_endpoint)


def test_max_cost_with_an_unknown_price_refuses_to_start():
    with run_simulator() as sim:
        with pytest.raises(RunAborted) as caught:
            Gateway(endpoint(sim, model="mystery-model", max_cost=5.0))
        assert "mystery-model" in str(caught.value) and "price" in str(caught.value)
        # ... and so does a call naming such a model on a capped gateway.
        gateway = Gateway(endpoint(sim, max_cost=5.0, prices={MODEL: (PRICE, PRICE, PRICE)}))
        with pytest.raises(RunAborted):
            gateway.prepare(ask(0), SAMPLING, model="mystery-model")
        assert sim.stats()["requests"] == 0


# -- early stop -------------------------------------------------------------------------------


def test_most_calls_failing_stops_the_run_early(transport):
    window = 10
    with run_simulator(faults={"truncated_json": 1.0}) as sim:
        config = endpoint(sim, transport, failure_window=window, max_failure_rate=0.5)
        with pytest.raises(TooManyFailures) as caught:
            run(config, lambda g: parse_all(g, 100, concurrent=False, repair_attempts=0))
        assert sim.stats()["requests"] == window
        message = str(caught.value)
        assert f"{window} of the {window} calls so far failed" in message and "invalid_json" in message

        # Concurrently: the calls in flight finish, the rest stop without a request.
        sim.reset_stats()
        config = endpoint(sim, transport, failure_window=window, limits=RateLimits(rpm=0, max_in_flight=4))
        results, gateway = run(config, lambda g: parse_all(g, 100, repair_attempts=0))
        assert all(isinstance(r, TooManyFailures) for r in results[window + 4:])
        assert sim.stats()["requests"] <= window + 4 and len(gateway.failures) <= window + 4


def test_a_broken_endpoint_stops_the_run_on_the_recent_window(transport):
    window = 10
    with run_simulator(faults={"http_500": 1.0}) as sim:
        retries = RETRIES.model_copy(update={"max_attempts": 2})
        config = endpoint(sim, transport, failure_window=window, retries=retries)
        with pytest.raises(TooManyFailures) as caught:
            run(config, lambda g: parse_all(g, 100, concurrent=False))
        assert sim.stats()["requests"] == 2 * window
    assert f"{window} of the last {window} calls failed" in str(caught.value) and "http_500" in str(caught.value)


def test_good_replies_in_flight_when_the_run_stops_are_journaled_and_returned(transport, tmp_path):
    # Most replies are broken, so the run stops early; the calls still in flight finish. Their good replies
    # were paid for: each must be journaled (else a rerun pays again) and reach its caller.
    with run_simulator(faults={"truncated_json": 0.7}, latency_ms=20, jitter_ms=15, seed=4) as sim:
        config = endpoint(sim, transport, failure_window=10, limits=RateLimits(rpm=0, max_in_flight=16))
        results, _ = run(config, lambda g: parse_all(g, 80, repair_attempts=0), Journal(str(tmp_path)))
        stats = sim.stats()
    assert any(isinstance(r, TooManyFailures) for r in results) and stats["requests"] < 80  # stopped early
    assert stats["ok"] > 0 and len(Journal(str(tmp_path))) == stats["paid"]  # every reply paid for, rejected or not
    assert sum(isinstance(r, Completion) for r in results) == stats["ok"]


def test_rate_limit_failures_do_not_count_toward_the_early_stop(transport):
    # One request fits the endpoint's burst; with a single attempt the other 11 fail as rate_limited.
    with run_simulator(rpm=60, burst_s=1) as sim:
        config = endpoint(sim, transport, failure_window=10, retries=RETRIES.model_copy(update={"max_attempts": 1}))
        results, gateway = run(config, lambda g: parse_all(g, 12))
        stats = sim.stats()
    assert stats["ok"] == 1 and stats["rate_limited"] == 11
    assert sum(r is None for r in results) == 11 and not any(isinstance(r, BaseException) for r in results)
    assert {f.reason for f in gateway.failures} == {"rate_limited"}


# -- never pay twice --------------------------------------------------------------------------


def test_second_run_is_answered_from_the_journal_with_zero_requests(transport, tmp_path):
    n = 10

    async def both(gateway):
        parsed = await parse_all(gateway, n)
        chatted = [await gateway.chat(ask(i), stage="free", key=f"c{i}", sampling=SAMPLING) for i in range(n)]
        return parsed + chatted

    with run_simulator() as sim:
        first, _ = run(endpoint(sim, transport), both, Journal(str(tmp_path)))
        assert sim.stats()["ok"] == 2 * n and not any(r.from_journal for r in first)
        sim.reset_stats()
        second, gateway = run(endpoint(sim, transport), both, Journal(str(tmp_path)))
        assert sim.stats()["requests"] == 0
    assert all(r.from_journal for r in second) and gateway.usage.journal_hits == 2 * n
    assert [r.content for r in second] == [r.content for r in first]
    assert [r.value for r in second] == [r.value for r in first]


# A worker process: n calls through a gateway with a journal, at most k in flight, printing each key once
# its reply is journaled, then "done <answered> <from journal>".
WORKER = """
import asyncio, sys
from facets.llm.gateway import Gateway, run_bounded
from facets.llm.journal import Journal
from facets.schemas.config import EndpointConfig, RateLimits, Sampling

base_url, data_dir, transport, n, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

async def main():
    config = EndpointConfig(base_url=base_url, api_key="sk-test", model="facets-sim", transport=transport,
                            limits=RateLimits(rpm=0, max_in_flight=k))
    async with Gateway(config, Journal(data_dir)) as gateway:
        async def one(i):
            messages = [{"role": "user", "content": f"Question {i}: why do tides happen?"}]
            reply = await gateway.chat(messages, stage="kill", key=str(i), sampling=Sampling(max_tokens=1000))
            print(i, flush=True)
            return reply
        replies = await run_bounded([lambda i=i: one(i) for i in range(n)], 2 * k)
    print("done", sum(r is not None for r in replies), sum(r.from_journal for r in replies if r), flush=True)

asyncio.run(main())
"""


def worker(sim, data_dir, transport: str, n: int, k: int) -> subprocess.Popen:
    args = [sys.executable, "-c", WORKER, sim.base_url, str(data_dir), transport, str(n), str(k)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, text=True)


# Journaling does not depend on the transport; the openai one only adds its import time to two processes.
@pytest.mark.parametrize("transport", ["lean", pytest.param("openai", marks=pytest.mark.slow)])
def test_kill_9_mid_run_then_rerun_pays_at_most_the_calls_in_flight_again(transport, tmp_path):
    n, k = 60, 4
    with run_simulator(latency_ms=40) as sim:
        first = worker(sim, tmp_path, transport, n, k)
        done_before_kill = [first.stdout.readline() for _ in range(n // 3)]
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL and all(line.strip() for line in done_before_kill)
        paid_before_rerun = sim.stats()["paid"]
        assert n // 3 <= paid_before_rerun < n  # killed mid-run

        second = worker(sim, tmp_path, transport, n, k)
        out, _ = second.communicate(timeout=60)
        stats = sim.stats()
    assert second.returncode == 0
    _, answered, from_journal = out.split()[-3:]
    assert int(answered) == n and int(from_journal) >= n // 3
    assert stats["requests"] <= n + k and stats["paid_twice"] <= k
    assert stats["distinct_request_hashes"] == n
    config = EndpointConfig(base_url=sim.base_url, api_key="sk-test", model=MODEL)
    keys = [Gateway(config).prepare([{"role": "user", "content": f"Question {i}: why do tides happen?"}],
                                    Sampling(max_tokens=1000)).key for i in range(n)]
    journal = Journal(str(tmp_path))
    assert all(journal.get(key) is not None for key in keys)


# -- batch mode -------------------------------------------------------------------------------


def test_batch_mode_end_to_end_resumes_by_id_and_feeds_online_runs(tmp_path):
    n = 20
    data_dir = str(tmp_path)
    state_dir = tmp_path / "journal" / "batches"

    def items(gateway):
        return [BatchItem(gateway.prepare(ask(i), SAMPLING, schema=Verdict, check=substantive), "trees", f"k{i}") for i in range(n)]

    async def interrupted(gateway):
        runner = BatchRunner(gateway, data_dir, poll_initial_s=0.05, poll_max_s=0.1)
        task = asyncio.create_task(runner.run(items(gateway)))
        while not (state_dir.is_dir() and any(state_dir.iterdir())):  # submitted and its id saved
            await asyncio.sleep(0.01)
        task.cancel()  # the worker dies while the batch runs
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.aclose()

    async def restarted(gateway):
        runner = BatchRunner(gateway, data_dir, poll_initial_s=0.05, poll_max_s=0.1)
        try:
            return await runner.run(items(gateway))
        finally:
            await runner.aclose()

    with run_simulator(batch_delay_s=0.5) as sim:
        config = endpoint(sim, prices={MODEL: (PRICE, PRICE, PRICE)})
        run(config, interrupted, Journal(data_dir))
        assert sim.stats()["batch"]["batches"] == 1
        results, gateway = run(config, restarted, Journal(data_dir))
        stats = sim.stats()
        assert stats["batch"]["batches"] == 1 and stats["batch"]["lines"] == n  # found by id, not submitted again
        assert stats["requests"] == 0
        assert sorted(results) == sorted(f"k{i}" for i in range(n)) and answered(results.values())
        batch_cost = (stats["prompt_tokens"] + stats["completion_tokens"]) * PRICE / 1e6 / 2  # half price
        assert gateway.usage.summary()["cost_usd"] == pytest.approx(batch_cost)
        journal = Journal(data_dir)
        assert all(journal.get(r.key).source == "batch" for r in results.values())

        for transport in TRANSPORTS:  # a later online run pays for nothing
            online, gateway = run(endpoint(sim, transport, prices={MODEL: (PRICE, PRICE, PRICE)}),
                                  lambda g: parse_all(g, n), Journal(data_dir))
            assert all(r.from_journal for r in online) and gateway.usage.journal_hits == n
            assert [r.value for r in online] == [results[f"k{i}"].value for i in range(n)]
        assert sim.stats()["requests"] == 0 and sim.stats()["batch"]["batches"] == 1


# -- usage ------------------------------------------------------------------------------------


def test_usage_summary_agrees_with_the_endpoint(transport):
    n = 20
    with run_simulator(faults={"http_500": 0.2}, rpm=1200, burst_s=0.25, seed=2) as sim:
        config = endpoint(sim, transport, prices={MODEL: (PRICE, PRICE / 2, PRICE)},
                          limits=RateLimits(rpm=1200, max_in_flight=8), retries=RETRIES.model_copy(update={"max_attempts": 10}))

        async def body(gateway):
            results = await parse_all(gateway, n)
            cut = await gateway.chat(ask(99), stage="test", key="cut", sampling=Sampling(max_tokens=4), repair_attempts=0)
            return results, cut

        (results, cut), gateway = run(config, body)
        stats = sim.stats()
    summary = gateway.usage.summary()
    assert answered(results) and cut is None, gateway.failures
    assert summary["requests"] == stats["requests"] and summary["ok"] == stats["paid"] == n + 1
    assert summary["rate_limited"] == stats["rate_limited"] >= 1
    assert summary["errors"] == {"http_500": stats["faults"]["http_500"]} and stats["faults"]["http_500"] >= 1
    assert summary["retries"] == stats["requests"] - (n + 1)
    assert summary["failures"] == {"length": 1}
    assert (summary["prompt_tokens"], summary["completion_tokens"]) == (stats["prompt_tokens"], stats["completion_tokens"])
    assert summary["cost_usd"] == pytest.approx((stats["prompt_tokens"] + stats["completion_tokens"]) * PRICE / 1e6)
    assert 0 < summary["latency_p50_s"] <= summary["latency_p95_s"]


def test_unknown_model_cost_is_reported_as_unknown_never_zero(transport):
    with run_simulator() as sim:
        results, gateway = run(endpoint(sim, transport, model="house-model-7b"), lambda g: parse_all(g, 3))
    summary = gateway.usage.summary()
    assert answered(results) and summary["completion_tokens"] > 0
    assert summary["cost_usd"] is None
