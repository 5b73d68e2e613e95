"""Checks an endpoint before a run spends anything: reachable, key accepted, every model served, and
which way of asking for structured output it answers.

A bad key, a typo in a model name, a dead URL or a server that refuses our response format should stop
a build in a second with one clear line, not after thousands of failed calls.
"""
from __future__ import annotations

import asyncio
import logging
import re
import sys
import time

from pydantic import BaseModel

from facets.llm.dialects import DIALECTS, describe
from facets.llm.errors import (BadRequest, CallError, EndpointUnreachable, FatalEndpointError, MissingCredentials,
                               TooManyFailures)
from facets.llm.gateway import SIMULATOR_HINT, UNREACHABLE, Call, Gateway, Rejected, endpoint_transport
from facets.llm.journal import Journal
from facets.llm.limiters import Limiters
from facets.schemas.config import EndpointConfig, Sampling

# a server's id for a model may carry a folder or org prefix, a weights file's extension, other case
WEIGHTS_EXTENSION = re.compile(r"\.(gguf|ggml|bin|safetensors|pt|pth|llamafile)$", re.IGNORECASE)
# the structured-output probe: one tiny call per model and dialect, journaled like any call
PROBE_MESSAGES = [{"role": "user",
                   "content": 'Is water wet? Answer with a JSON object: {"ok": true} or {"ok": false}.'}]
PROBE_SAMPLING = Sampling(temperature=0, top_p=1, max_tokens=64)


class ProbeReply(BaseModel):
    ok: bool


def check_share(url: str) -> None:
    """The Redis that splits the limits among workers answers, or nothing is sent."""
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=5).ping()
    except (redis.exceptions.RedisError, ValueError) as exc:
        raise FatalEndpointError(f"share_via: no Redis answers at {url} ({exc}); the workers could not "
                                 "share the endpoint's limits, so nothing was sent") from None


async def check_endpoint(endpoint: EndpointConfig, models: list[str]) -> list[str] | None:
    """The models the endpoint lists (None when it lists none); raises `RunAborted` subclasses."""
    import openai  # here, not at the top: a shard run on a worker never checks and skips its 1-2 s import

    if endpoint.api_key is None and endpoint.base_url is None:
        raise MissingCredentials(f"no endpoint configured: set OPENAI_API_KEY to call OpenAI, {SIMULATOR_HINT}")
    if endpoint.limits.share_via:
        check_share(endpoint.limits.share_via)
    key = endpoint.api_key.get_secret_value() if endpoint.api_key else "unused"
    client = openai.AsyncOpenAI(base_url=endpoint.url, api_key=key, max_retries=2, timeout=min(30.0, endpoint.retries.timeout_s))
    try:
        served = [m.id async for m in client.models.list()]
    except openai.AuthenticationError as exc:
        raise FatalEndpointError(f"{endpoint.url} rejected the API key (401): check OPENAI_API_KEY ({exc.message})") from None
    except openai.PermissionDeniedError as exc:
        raise FatalEndpointError(f"{endpoint.url} refused access (403): {exc.message}") from None
    except (openai.NotFoundError, openai.UnprocessableEntityError):
        return None  # a server without a model list: the first call will tell
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        raise EndpointUnreachable(f"{endpoint.url} could not be reached ({exc}); check OPENAI_BASE_URL, {SIMULATOR_HINT}") from None
    except openai.APIStatusError as exc:
        raise EndpointUnreachable(f"{endpoint.url} answered {exc.status_code} to GET /models: {exc.message}") from None
    finally:
        await client.close()
    unknown = sorted(model for model in set(models) if served_as(model, served) is None)
    for model in sorted(set(models) - set(served) - set(unknown)):
        _logger().warning("model %r is served as %r; calls name it %r as configured", model,
                          served_as(model, served), model)
    if served and unknown:
        listed = ", ".join(served[:12]) + (" ..." if len(served) > 12 else "")
        raise FatalEndpointError(f"{endpoint.url} does not serve {', '.join(map(repr, unknown))}; it serves: {listed}")
    return served


def served_as(model: str, served: list[str]) -> str | None:
    """The id in `served` that is `model`: the same, or the same but for case, a prefix or an extension
    (`smollm2` is `Smollm2` and `models/smollm2.gguf`)."""
    if model in served:
        return model
    plain = _plain_id(model)
    return next((s for s in served if _plain_id(s) == plain), None)


def _plain_id(model: str) -> str:
    return WEIGHTS_EXTENSION.sub("", model.rstrip("/").rsplit("/", 1)[-1]).lower()


async def choose_structured_output(endpoint: EndpointConfig, models: list[str],
                                   journal: Journal | None = None) -> EndpointConfig:
    """The endpoint with `structured_output` set to the dialect (llm/dialects.py) it answers for every one
    of `models`: with `auto` the first of them in order whose tiny probe call comes back as valid JSON of
    the probe's schema, else the one set, checked the same way. A refusal (4xx, or a 5xx that says the
    request is invalid) or an unusable reply moves on to the next; a bad key, an unknown model or an
    unreachable endpoint stop as they always do. Probes are journaled: a rerun sends none."""
    dialects = list(DIALECTS) if endpoint.structured_output == "auto" else [endpoint.structured_output]
    models = list(dict.fromkeys(models))
    transport, limiters = endpoint_transport(endpoint), Limiters()
    try:
        gateways = {d: Gateway(endpoint.model_copy(update={"structured_output": d}), journal, transport=transport,
                               limiters=limiters) for d in dialects}
        chosen, answers = await _first_answered(gateways, models)
    finally:
        await transport.close()
        limiters.close()
    named = f"model{'s' if len(models) > 1 else ''} {', '.join(models)}"
    if chosen is None:
        said = "; ".join(f"{d}: {answer}" for d, answer in answers.items())
        how = ("set endpoint.structured_output to one the server takes, or check the server" if len(dialects) > 1
               else "set endpoint.structured_output to auto, or to one the server takes")
        raise FatalEndpointError(f"{endpoint.url} answers no structured-output request for {named} ({said}); {how}")
    _logger().info("structured output: %s for %s", describe(chosen), named)
    return endpoint.model_copy(update={"structured_output": chosen})


async def _first_answered(gateways: dict[str, Gateway], models: list[str]) -> tuple[str | None, dict[str, str]]:
    """(the first dialect every model answers, what each one tried before it answered instead)."""
    calls = {d: [_probe_call(g, m) for m in models] for d, g in gateways.items()}
    for dialect, gateway in gateways.items():  # a rerun: the first dialect whose probes a run before paid for
        if all(gateway.from_journal(call) is not None for call in calls[dialect]):
            return dialect, {}
    answers: dict[str, str] = {}
    for dialect, gateway in gateways.items():
        for call in calls[dialect]:
            if (answer := await _probe(gateway, call)) is not None:
                answers[dialect] = answer if len(models) == 1 else f"{call.model}: {answer}"
                break
        else:
            return dialect, answers
    return None, answers


def _probe_call(gateway: Gateway, model: str) -> Call:
    return gateway.prepare(PROBE_MESSAGES, PROBE_SAMPLING, schema=ProbeReply, model=model)


async def _probe(gateway: Gateway, call: Call) -> str | None:
    """None when the reply is valid JSON of the probe's schema (then journaled), else what came back, in
    a few words. Passing faults are retried as any call's, for `stall_s` at most; a probe they never let
    through is the endpoint failing, not the dialect: the run stops there (429s without end, 5xx, bodies that
    are not JSON), before any paid work. A 401/403/404 raises as any call's."""
    endpoint, retries = gateway.endpoint, gateway.endpoint.retries
    first = time.monotonic()
    for attempt in range(1, retries.max_attempts + 1):
        started = time.perf_counter()
        try:
            reply = await gateway.transport.chat(call.body)
        except BadRequest as exc:  # 4xx, or a 5xx that says the request is invalid: this dialect is refused
            return _in_words(exc)
        except CallError as exc:
            backoff = max(exc.retry_after or 0.0, min(retries.backoff_max_s, retries.backoff_initial_s * 2 ** (attempt - 1)))
            if attempt < retries.max_attempts and time.monotonic() + backoff - first < endpoint.stall_s:
                await asyncio.sleep(backoff)
                continue
            if exc.reason in UNREACHABLE:
                raise EndpointUnreachable(f"{gateway.url} could not be reached after {attempt} attempts ({exc}); "
                                          f"check OPENAI_BASE_URL, {SIMULATOR_HINT}") from None
            raise TooManyFailures(f"stopped before any paid work: {gateway.url} answered all {attempt} tries of a "
                                  f"one-call probe in {time.monotonic() - first:.0f} s with {_in_words(exc)}") from None
        try:
            value = gateway.judge(call, reply)
        except Rejected as exc:
            return _in_words(f"{exc.reason}: {exc}")
        gateway.record(call, reply, value, time.perf_counter() - started, "online")
        return None
    return None  # not reached: the last attempt returns or raises


def _in_words(answer: object, limit: int = 160) -> str:
    """An answer on one short line."""
    text = " ".join(str(answer).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _logger() -> logging.Logger:
    """The flow run's logger inside a run (its lines reach the UI), this module's outside one. Prefect not
    imported yet means no run: it is not imported for this (a second or two)."""
    prefect = sys.modules.get("prefect")
    if prefect is not None:
        try:
            return prefect.get_run_logger()
        except Exception:  # no run context: a direct call, a test
            pass
    return logging.getLogger(__name__)
