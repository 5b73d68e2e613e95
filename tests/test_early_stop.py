"""A run whose calls all fail stops early, whatever the failure class and however few calls are in flight,
and keeps every failure as it happens. Faults come from the simulator or from a small loopback server of
the test's own (an endpoint that only answers 429, or bodies that are not JSON); requests are counted there."""
from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from aiohttp import web
from pydantic import BaseModel

from facets.flows.build import build_collection
from facets.llm.errors import FatalEndpointError, TooManyFailures
from facets.llm.gateway import Gateway
from facets.simulator.server import run_simulator
from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits, Retries, Sampling
from facets.schemas import Failure
from facets.storage import Store

SOURCES = Path(__file__).parent / "data" / "sources"
NECTAR = f"nectar={SOURCES / 'nectar' / 'data.jsonl'}"
STALL_S = 3.0
RETRIES = Retries(max_attempts=8, timeout_s=5.0, deadline_s=600.0, backoff_initial_s=0.2, backoff_max_s=1.0)
STALLED = re.compile(r"no reply was accepted in (?P<s>\d+) s while (?P<failed>\d+) attempts failed")
WINDOW = re.compile(r"(?P<failed>\d+) of the last (?P=failed) calls failed")


class Answer(BaseModel):
    answer: str



@contextmanager
def endpoint_that(status: int, body: bytes, headers: dict[str, str] | None = None) -> Iterator[dict]:
    """A loopback chat endpoint that gives every request the same answer; yields its URL and request count."""
    seen = {"requests": 0, "url": ""}

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        seen["requests"] += 1
        return web.Response(status=status, body=body, headers=headers or {}, content_type="application/json")

    ready, stop = threading.Event(), None

    def serve() -> None:
        nonlocal stop
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        seen["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/v1"
        stop = asyncio.Event()
        ready.set()
        loop.run_until_complete(stop.wait())
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield seen
    finally:
        stop._loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def gateway_config(url: str, **fields) -> EndpointConfig:
    values = dict(base_url=url, api_key="sk-test", model="m", retries=RETRIES, stall_s=STALL_S,
                  limits=RateLimits(rpm=0, max_in_flight=2))
    return EndpointConfig(**{**values, **fields})


def ask_many(config: EndpointConfig, n: int = 40) -> list:
    """n structured calls with few in flight; their results or exceptions."""

    async def main():
        async with Gateway(config) as gateway:
            calls = [gateway.parse([{"role": "user", "content": f"q{i}"}], Answer, stage="t", key=f"k{i}",
                                   sampling=Sampling(max_tokens=50)) for i in range(n)]
            return await asyncio.gather(*calls, return_exceptions=True)

    return asyncio.run(main())


def stopped(results: list) -> TooManyFailures:
    errors = [r for r in results if isinstance(r, TooManyFailures)]
    assert errors, f"the run did not stop: {results[:3]}"
    return errors[0]


def assert_stalled(error: TooManyFailures, requests: int, in_flight: int = 2) -> None:
    """Stopped by the stall, once STALL_S had passed on the gateway's clock, and nothing was sent after the stop
    but the calls already in flight: the endpoint saw no more requests than the attempts the stop counted.
    A machine quick enough to fill the failure window first stops by the window instead: as early a stop."""
    if WINDOW.search(str(error)):
        return
    stall = STALLED.search(str(error))
    assert stall, f"not stopped by the stall nor the window: {error}"
    assert int(stall["s"]) >= STALL_S
    assert requests <= int(stall["failed"]) + in_flight, (requests, str(error))


@pytest.mark.parametrize("status, body, headers, reason", [
    (429, b'{"error": {"message": "Rate limit reached"}}', {"retry-after": "1"}, "rate_limited"),
    (200, b"<html>upstream gateway hiccup</html>", {}, "malformed_reply"),
    (503, b'{"error": {"message": "overloaded"}}', {}, "http_503"),
    (200, b'{"choices": []}', {}, "malformed_reply"),
])
def test_every_failure_class_stops_within_the_stall_time_with_few_calls_in_flight(status, body, headers, reason):
    n = 200
    with endpoint_that(status, body, headers) as server:
        results = ask_many(gateway_config(server["url"]), n)
    error = stopped(results)
    assert "stopped early" in str(error) and reason in str(error)
    assert_stalled(error, server["requests"])  # a window of calls fills far too slowly with two in flight
    assert server["requests"] < n * RETRIES.max_attempts  # the queue behind stopped without a request


def test_replies_that_always_fail_their_checks_stop_the_run():
    # Schema-valid filler every time: each call is repaired twice and fails; with two in flight the
    # failure window would take minutes to fill.
    with run_simulator(faults={"off_spec": 1.0}, latency_ms=200) as sim:
        config = gateway_config(sim.base_url, model="facets-sim")

        async def main():
            async with Gateway(config) as gateway:
                def check(value: BaseModel) -> None:
                    raise ValueError("not what was asked")
                calls = [gateway.parse([{"role": "user", "content": f"q{i}"}], Answer, stage="t", key=f"k{i}",
                                       sampling=Sampling(max_tokens=50), check=check) for i in range(60)]
                return await asyncio.gather(*calls, return_exceptions=True), gateway

        results, gateway = asyncio.run(main())
        requests = sim.stats()["requests"]
    error = stopped(results)
    # 60 requests take 6 s at two in flight and 200 ms each, twice the stall time; a busy machine sends fewer
    assert "rejected" in str(error) and requests < 60
    assert_stalled(error, requests)
    # the reply the run stopped on is its call's failure, with the raw output
    assert gateway.failures and all(f.raw_output for f in gateway.failures)


def test_a_request_the_server_refuses_in_a_5xx_is_not_retried_and_stops_the_run():
    # llama-cpp-python answers a response format it does not take with a 500 and pydantic's words.
    body = (b'{"error": {"message": "1 validation error for CreateChatCompletionRequest\\nresponse_format.type\\n'
            b'  Input should be \'text\' or \'json_object\'"}}')
    with endpoint_that(500, body) as server:
        results = ask_many(gateway_config(server["url"]))
    errors = [r for r in results if isinstance(r, FatalEndpointError)]
    assert errors and "Input should be 'text' or 'json_object'" in str(errors[0])
    assert server["requests"] <= 4  # three refusals, and the one beside them in flight
    assert not any(isinstance(r, TooManyFailures) for r in results), "stopped by the refusals, before the stall"


# --- a build that stops keeps its failures --------------------------------------------------------

@pytest.mark.slow
def test_a_build_stopped_early_keeps_every_failure_with_its_raw_output(tmp_path, prefect_server):
    with run_simulator(faults={"off_spec": 1.0}) as sim:  # schema-valid filler that no stage accepts
        endpoint = EndpointConfig(base_url=sim.base_url, api_key="sk-test", model="facets-sim", stall_s=60,
                                  failure_window=10, limits=RateLimits(rpm=0, max_in_flight=4), retries=RETRIES)
        config = BuildConfig(sources=[NECTAR], limit=8, shard_size=4, data_dir=str(tmp_path), endpoint=endpoint,
                             publish=False)
        with pytest.raises(TooManyFailures):
            asyncio.run(build_collection(config))
        paid = sim.stats()["paid"]
    failures = Store(str(tmp_path)).read("failures").to_pylist()
    assert failures and all(f["raw_output"] for f in failures)
    assert 3 * len(failures) <= paid  # each failed call: asked, then repaired twice
    assert not list((tmp_path / "failures" / "live").glob("*.jsonl"))  # written, not left live


@pytest.mark.parametrize("status, body, reason", [
    (429, b'{"error": {"message": "Rate limit reached"}}', "rate_limited"),
    (200, b"<html>upstream gateway hiccup</html>", "malformed_reply"),
])
def test_an_endpoint_that_fails_every_call_stops_at_the_preflight_probe_within_the_stall_time(status, body, reason):
    from facets.llm.preflight import choose_structured_output

    with endpoint_that(status, body, {"retry-after": "1"}) as server:
        with pytest.raises(TooManyFailures) as caught:
            asyncio.run(choose_structured_output(gateway_config(server["url"]), ["m"]))
    assert "before any paid work" in str(caught.value) and reason in str(caught.value)
    assert server["requests"] <= RETRIES.max_attempts  # one dialect's probe, not four
    tries = re.search(r"all (\d+) tries of a one-call probe", str(caught.value))
    assert tries and int(tries[1]) == server["requests"], "the probe's tries, and nothing sent after them"


def test_failures_of_a_process_killed_with_sigkill_are_written_by_the_next_build(tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from facets.storage.failure_log import FailureLog, recover_failures

    child = f"""
import os, signal
from facets.schemas import Failure
from facets.schemas import Failure
from facets.storage import Store
from facets.storage.failure_log import FailureLog
log = FailureLog(Store({str(tmp_path)!r}), "responses")
for i in range(2):
    log.add(Failure(stage="responses", key=f"i{{i}}#0", reason="length", raw_output=f"cut reply {{i}}"))
os.kill(os.getpid(), signal.SIGKILL)
"""
    done = subprocess.run([sys.executable, "-c", child], timeout=60)
    assert done.returncode == -signal.SIGKILL
    store = Store(str(tmp_path))
    alive = FailureLog(store, "trees")  # a live process's file is left to it
    alive.add(Failure(stage="trees", key="i9#0", reason="rejected", raw_output="mine"))
    assert recover_failures(store) == 2
    kept = store.read("failures").to_pylist()
    assert sorted((f["key"], f["raw_output"]) for f in kept) == [("i0#0", "cut reply 0"), ("i1#0", "cut reply 1")]
    assert recover_failures(store) == 0 and os.path.exists(alive.path)
    alive.close()
