"""What the gateway's tests share: a simulator endpoint's config, the calls they send, and a fresh gateway
per run. Counts are read at the simulator (`/stats`), never from these helpers."""
from __future__ import annotations

import asyncio

from pydantic import BaseModel, Field

from facets.llm.gateway import Completion, Gateway
from facets.llm.journal import Journal
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
