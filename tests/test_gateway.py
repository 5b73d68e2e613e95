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

from facets.llm.batch import BatchItem, BatchRunner
from facets.llm.errors import (
    BudgetExceeded,
    EndpointUnreachable,
    FatalEndpointError,
    MissingCredentials,
    RunAborted,
    TooManyFailures,
)
from facets.llm.gateway import Completion, Gateway
from facets.llm.journal import Journal
from facets.simulator.server import SimulatorProcess, max_in_window, run_simulator
from facets.schemas.config import EndpointConfig, RateLimits, Sampling
from gateway_helpers import (
    MODEL,
    PRICE,
    RETRIES,
    SAMPLING,
    TRANSPORTS,
    UNLIMITED,
    Verdict,
    answered,
    ask,
    endpoint,
    parse_all,
    run,
    substantive,
)


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
    # once per 429) finishes close to the endpoint's own pace, measured beside it on the same machine by a
    # gateway whose burst is the endpoint's (16 calls at 10/s: about 1.6 s; some 10 times that when each
    # 429 cut the rate).
    n = 16
    retries = RETRIES.model_copy(update={"max_attempts": 20})

    def timed(limits: RateLimits):
        started = time.monotonic()
        results, gateway = run(endpoint(sim, transport, limits=limits, retries=retries), lambda g: parse_all(g, n))
        return results, gateway, time.monotonic() - started

    with run_simulator(rpm=600, burst_s=0.1) as sim:
        paced, _, paced_s = timed(RateLimits(rpm=600, burst_s=0.1, max_in_flight=32))
        assert answered(paced)
        sim.reset_stats()
        results, gateway, storm_s = timed(RateLimits(rpm=600, max_in_flight=32))
        stats = sim.stats()
    assert answered(results)
    assert stats["ok"] == n and stats["paid_twice"] == 0 and gateway.failures == []
    assert 5 <= stats["rate_limited"] <= 2 * n  # a storm, but no thundering herd of retries
    assert gateway.usage.rate_limited == stats["rate_limited"]
    assert storm_s < 3 * paced_s, f"the rate did not recover after the storm: {storm_s:.1f} s, paced {paced_s:.1f} s"


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

        async def one(gateway):
            limiter = gateway.limiters.get(gateway.url, MODEL, gateway.endpoint.limits)
            await gateway.parse(ask(0), Verdict, stage="test", key=key, sampling=SAMPLING, check=substantive)
            return limiter.pause_remaining()

        held, _ = run(endpoint(sim, limits=shared), one)
        # empty: it holds until the endpoint has refilled what Redis holds full (5 s at 1 request a second)
        assert held > 3.0, "the reply said the endpoint was nearly empty: sends wait for it to refill"


def test_only_calls_near_the_front_hold_a_reservation(transport):
    """1,000 queued calls reserve a few at a time, so a first guess at reply length paces a few, not all."""
    in_flight, n = 4, 200
    seen: list[float] = []

    async def body(gateway):
        limiter = gateway.limiters.get(gateway.url, MODEL, gateway.endpoint.limits)

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
    with pytest.raises(EndpointUnreachable) as caught:
        asyncio.run(_parse_one(config))
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
