"""Bounds on what a call may cost and carry: the size of a reply, the prompt against the model's context
window, and no credentials in a URL (nor any secret in Prefect's flow-run parameters).

A runaway endpoint is a loopback aiohttp server of this file's own that streams a valid reply of any size
and counts what it was sent; everything else is the real gateway, transports, simulator and Prefect.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
from aiohttp import web
from pydantic import ValidationError

from facets.llm.context_window import known_window
from facets.llm.gateway import REPAIR_ECHO_BYTES, Gateway
from facets.simulator.server import run_simulator
from facets.schemas import Failure
from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits, Retries, Sampling, config_error
from facets.schemas.evaluation import ModelSpec
from facets.schemas.records import RAW_OUTPUT_MAX_BYTES

MIB = 1024 * 1024
RETRIES = Retries(max_attempts=4, timeout_s=30.0, deadline_s=60.0, backoff_initial_s=0.01, backoff_max_s=0.05)
SAMPLING = Sampling(max_tokens=500, seed=1)
QUESTION = [{"role": "user", "content": "Why do tides happen?"}]



class RunawayEndpoint:
    """Answers every chat completion with a valid reply whose content is `content_bytes` of 'x', streamed in
    1 MiB pieces (the server's own memory stays flat), with or without a Content-Length; keeps each request."""

    def __init__(self, content_bytes: int, content_length: bool = True):
        self.content_bytes = content_bytes
        self.content_length = content_length
        self.requests: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        head = b'{"choices":[{"index":0,"message":{"role":"assistant","content":"'
        tail = b'"},"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":10}}'
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.content_length:
            response.content_length = len(head) + self.content_bytes + len(tail)
        await response.prepare(request)
        piece = b"x" * MIB
        with contextlib.suppress(ConnectionError):  # a client that stopped reading hangs up
            await response.write(head)
            for start in range(0, self.content_bytes, MIB):
                await response.write(piece[: min(MIB, self.content_bytes - start)])
            await response.write(tail)
            await response.write_eof()
        return response

    async def _start(self) -> None:
        app = web.Application(client_max_size=64 * MIB)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def __enter__(self) -> "RunawayEndpoint":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def endpoint(url: str, transport: str = "lean", **fields) -> EndpointConfig:
    return EndpointConfig(**{"base_url": url, "api_key": "sk-test", "model": "facets-sim", "transport": transport,
                             "limits": RateLimits(rpm=0, max_in_flight=8), "retries": RETRIES, **fields})


class PeakRss:
    """The most this process's resident memory grew above where it was, sampled every millisecond."""

    def __init__(self):
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.001)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / MIB


# -- the size of a reply ----------------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["lean", "openai"])
@pytest.mark.parametrize("content_length", [True, False], ids=["content-length", "chunked"])
def test_a_60_mb_reply_is_cut_at_the_cap_kept_as_its_head_and_not_asked_again(transport, content_length):
    async def main():
        async with Gateway(endpoint(server.base_url, transport)) as gateway:
            await gateway.chat(QUESTION, stage="responses", key="warm-up", sampling=SAMPLING)  # imports, pools
            gateway.drain_failures()
            server.requests.clear()
            with PeakRss() as rss:
                done = await gateway.chat(QUESTION, stage="responses", key="k1", sampling=SAMPLING)
            return done, gateway.drain_failures(), rss

    with RunawayEndpoint(60 * MIB, content_length) as server:
        done, failures, rss = asyncio.run(main())
    assert done is None
    assert len(server.requests) == 1, "a reply past the cap is not asked for again (it would be paid again)"
    [failure] = failures
    assert failure.reason == "reply_too_large" and "max_reply_bytes" in failure.detail
    assert failure.raw_output.startswith('{"choices"') and len(failure.raw_output) <= 2000, "only its head is kept"
    assert rss.growth_mb < 30, f"reading the reply grew memory by {rss.growth_mb:.0f} MB"


def test_a_reply_under_the_cap_is_read_whole():
    async def main():
        async with Gateway(endpoint(server.base_url, max_reply_bytes=MIB)) as gateway:
            return await gateway.chat(QUESTION, stage="responses", key="k", sampling=SAMPLING)

    with RunawayEndpoint(MIB - 200) as server:
        done = asyncio.run(main())
    assert done is not None and len(done.value) == MIB - 200


def test_a_rejected_long_reply_is_sent_back_clipped_and_kept_clipped():
    """A 1 MB reply (under the cap) that fails its check: each repair turn carries at most REPAIR_ECHO_BYTES
    of it, not the whole reply again, and its failure keeps at most RAW_OUTPUT_MAX_BYTES."""

    def check(text: str) -> None:
        raise ValueError("too long")

    async def main():
        async with Gateway(endpoint(server.base_url)) as gateway:
            done = await gateway.chat(QUESTION, stage="responses", key="k", sampling=SAMPLING, check=check)
            return done, gateway.drain_failures()

    with RunawayEndpoint(MIB) as server:
        done, failures = asyncio.run(main())
    assert done is None and len(server.requests) == 3, "the first ask and two repairs"
    for request in server.requests[1:]:
        echoed = request["messages"][-2]
        assert echoed["role"] == "assistant"
        assert len(echoed["content"].encode()) <= REPAIR_ECHO_BYTES and echoed["content"].endswith("characters cut ...]")
    [failure] = failures
    assert len(failure.raw_output.encode()) <= RAW_OUTPUT_MAX_BYTES and "characters cut" in failure.raw_output


def test_a_failure_keeps_its_raw_output_whole_up_to_the_limit():
    exact = Failure(stage="s", key="k", reason="r", raw_output="é" * (RAW_OUTPUT_MAX_BYTES // 2))
    assert exact.raw_output == "é" * (RAW_OUTPUT_MAX_BYTES // 2)
    clipped = Failure(stage="s", key="k", reason="r", raw_output="é" * RAW_OUTPUT_MAX_BYTES)
    assert len(clipped.raw_output.encode()) <= RAW_OUTPUT_MAX_BYTES
    assert clipped.raw_output.startswith("éé") and clipped.raw_output.endswith("more characters cut ...]")


# -- the context window --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, window", [
    ("gpt-4o", 128_000), ("gpt-4o-2024-08-06", 128_000), ("gpt-4o-mini", 128_000), ("gpt-4-0125-preview", 128_000),
    ("gpt-4-turbo-2024-04-09", 128_000), ("gpt-4", 8_192), ("gpt-4-0613", 8_192), ("gpt-3.5-turbo", 16_385),
    ("gpt-3.5-turbo-0613", 4_096), ("mistralai/Mistral-7B-Instruct-v0.2", 32_768),
    ("meta-llama/Meta-Llama-3-8B-Instruct", 8_192), ("meta-llama/Llama-3.1-70B-Instruct", 131_072),
    ("gpt-4.7", None), ("gpt-4omega", None), ("facets-sim", None),
])
def test_context_windows_are_known_by_prefix_and_only_on_a_boundary(model, window):
    assert known_window(model) == window


def test_a_prompt_past_the_model_s_window_is_not_sent_and_fails_only_its_row():
    huge = [{"role": "user", "content": "word " * 1_000_000}]  # 5 MB, about 1.25M tokens

    async def main(sim):
        async with Gateway(endpoint(sim.base_url, model="gpt-4o-mini")) as gateway:
            refused = await gateway.chat(huge, stage="responses", key="huge", sampling=SAMPLING)
            after = await gateway.chat(QUESTION, stage="responses", key="small", sampling=SAMPLING)
            return refused, after, gateway.drain_failures()

    with run_simulator() as sim:
        refused, after, failures = asyncio.run(main(sim))
        requests = sim.stats()["requests"]
    assert refused is None and after is not None, "a failure of its row, not a stop of the run"
    assert requests == 1, "only the call that fits reached the endpoint"
    [failure] = failures
    assert failure.reason == "context_window"
    assert "128000-token context window of 'gpt-4o-mini'" in failure.detail and "not sent" in failure.detail


def test_a_configured_window_counts_max_tokens_and_an_unknown_model_is_not_checked():
    short = [{"role": "user", "content": "x" * 400}]  # about 104 tokens

    async def main(sim, **fields):
        async with Gateway(endpoint(sim.base_url, **fields)) as gateway:
            done = await gateway.chat(short, stage="responses", key="k", sampling=Sampling(max_tokens=950))
            return done, gateway.drain_failures()

    with run_simulator() as sim:
        refused, failures = asyncio.run(main(sim, context_window=1000))
        assert sim.stats()["requests"] == 0 and refused is None
        assert [f.reason for f in failures] == ["context_window"]
        sent, _ = asyncio.run(main(sim, context_window=1100))
        unknown, _ = asyncio.run(main(sim))
        assert sim.stats()["requests"] == 2 and sent is not None and unknown is not None


# -- credentials in a URL ------------------------------------------------------------------------------------

SECRET = "pw-" + uuid.uuid4().hex


def test_a_base_url_with_credentials_is_refused_without_echoing_them(monkeypatch):
    url = f"https://someone:{SECRET}@llm.example.com/v1"
    for make in (lambda: EndpointConfig(base_url=url), lambda: BuildConfig(endpoint={"base_url": url}),
                 lambda: ModelSpec(name="m", base_url=url)):
        with pytest.raises(ValidationError) as refused:
            make()
        assert "must not carry credentials" in str(refused.value) and "OPENAI_API_KEY" in str(refused.value)
        assert SECRET not in str(refused.value) and SECRET not in config_error(refused.value)
    EndpointConfig(base_url="https://llm.example.com/v1/@models")  # an @ in the path is no credential
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    with pytest.raises(ValidationError, match="OPENAI_BASE_URL must not carry credentials") as refused:
        EndpointConfig()
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize("command", [["build", "--data-dir", "{tmp}"], ["estimate", "--limit", "10"]])
def test_facets_commands_name_credentials_in_openai_base_url_in_one_line(command, tmp_path):
    env = {**os.environ, "OPENAI_BASE_URL": f"http://someone:{SECRET}@127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-x"}
    done = subprocess.run([sys.executable, "-m", "facets.flows.cli", *(a.format(tmp=tmp_path) for a in command)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"facets {command[0]}: error: ")
    assert "OPENAI_BASE_URL must not carry credentials" in lines[0] and "OPENAI_API_KEY" in lines[0]
    assert SECRET not in done.stderr + done.stdout


@pytest.mark.slow
def test_no_secret_reaches_prefect_flow_run_parameters(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client

    from facets.flows.build import build_collection

    key = "sk-bounds-" + uuid.uuid4().hex
    nectar = f"nectar={os.path.join(os.path.dirname(__file__), 'data/sources/nectar/data.jsonl')}"

    def config(url: str) -> BuildConfig:
        return BuildConfig(sources=[nectar], limit=2, shard_size=2, data_dir=str(tmp_path), publish=False,
                           endpoint=EndpointConfig(base_url=url, api_key=key, model="facets-sim",
                                                   limits=RateLimits(rpm=60_000), retries=RETRIES))

    async def parameters() -> str:
        async with get_client() as client:
            return json.dumps([run.parameters for run in await client.read_flow_runs()], default=str)

    with run_simulator() as sim:
        report = asyncio.run(build_collection(config(sim.base_url)))
        assert report["accepted"] == 2
        with pytest.raises(ValueError, match="must not carry credentials"):
            asyncio.run(build_collection(config(sim.base_url.replace("//", f"//someone:{SECRET}@"))))
        stored = asyncio.run(parameters())
    assert "facets-sim" in stored and sim.base_url in stored, "the build's parameters were stored"
    assert key not in stored and SECRET not in stored
