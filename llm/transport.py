"""Two ways to send a chat completion, with one reply shape and one error vocabulary.

`LeanTransport` is aiohttp + orjson: the same request and reply as the openai SDK at a fraction of its
client CPU (decision 17). `OpenAITransport` goes through `openai.AsyncOpenAI` with its own retries off.
Both raise `CallError` subclasses; `status_error` is the single mapping from HTTP status to error.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import aiohttp
import orjson

from facets.llm.errors import BadRequest, CallError, FatalEndpointError, RateLimited

RETRYABLE_STATUS = {408, 409, 429} | set(range(500, 600))
FATAL_STATUS = {401: "authentication failed", 403: "permission denied", 404: "not found"}


@dataclass(slots=True)
class Reply:
    contents: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)


class Transport(Protocol):
    async def chat(self, body: dict) -> Reply: ...

    async def close(self) -> None: ...


def retry_after(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms` is the finer of the two; `retry-after` may be seconds (or fractional seconds)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                continue
    return None


def status_error(status: int, message: str, headers: Mapping[str, str], base_url: str) -> Exception:
    if status == 429:
        return RateLimited("rate_limited", message, status, retry_after(headers))
    if status in FATAL_STATUS:
        return FatalEndpointError(
            f"{base_url} answered {status} ({FATAL_STATUS[status]}): {message}. "
            "Check OPENAI_API_KEY, OPENAI_BASE_URL and the model name."
        )
    if status in RETRYABLE_STATUS:
        return CallError(f"http_{status}", message, status, retry_after(headers))
    return BadRequest(f"http_{status}", message, status)


def parse_reply(payload: Mapping, headers: Mapping[str, str]) -> Reply:
    choices = payload.get("choices") or []
    if not choices:
        raise CallError("malformed_reply", "no choices in the reply", raw=str(payload)[:2000])
    usage = payload.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return Reply(
        contents=[(c.get("message") or {}).get("content") or "" for c in choices],
        finish_reasons=[c.get("finish_reason") or "" for c in choices],
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
        headers=headers,
    )


class LeanTransport:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int):
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def chat(self, body: dict) -> Reply:
        payload, headers = await self.post_json(self.url, body)
        return parse_reply(payload, headers)

    async def post_json(self, url: str, body: dict) -> tuple[dict, Any]:
        """POST `body`, return the JSON reply and its headers; HTTP and network errors as `CallError`."""
        try:
            async with self._client().post(url, data=orjson.dumps(body), headers=self.headers, timeout=self.timeout) as response:
                raw = await response.read()
                headers = response.headers
                if response.status != 200:
                    raise status_error(response.status, _error_message(raw), headers, self.base_url)
        except asyncio.TimeoutError:
            raise CallError("timeout", f"no reply within {self.timeout.total:g}s") from None
        except aiohttp.ClientError as exc:
            raise CallError("connection", f"{type(exc).__name__}: {exc}") from None
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CallError("malformed_reply", "reply is not JSON", raw=raw[:2000].decode("utf-8", "replace")) from None
        return payload, headers

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _error_message(raw: bytes) -> str:
    try:
        error = orjson.loads(raw).get("error") or {}
        return str(error.get("message") or error)[:500]
    except (orjson.JSONDecodeError, AttributeError):
        return raw[:500].decode("utf-8", "replace")


class OpenAITransport:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int):
        import httpx
        import openai

        self.openai = openai
        self.raw_reply = httpx.Response  # `cast_to` for the reply as it came
        self.base_url = base_url.rstrip("/")
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout_s)

    async def chat(self, body: dict) -> Reply:
        openai = self.openai
        try:
            # The SDK's own request path (auth, headers, timeouts, error types) with the body as built:
            # `chat.completions.create` would walk the whole request (schema included) to transform it
            # and build a typed reply only for us to dump it again, a third of this transport's CPU.
            response = await self.client.post("/chat/completions", body=body, cast_to=self.raw_reply)
        except openai.APIStatusError as exc:
            raise status_error(exc.status_code, exc.message, exc.response.headers, self.base_url) from None
        except openai.APITimeoutError:
            raise CallError("timeout", "no reply within the timeout") from None
        except openai.APIConnectionError as exc:
            raise CallError("connection", str(exc)) from None
        raw = response.content
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CallError("malformed_reply", "reply is not JSON", raw=raw[:2000].decode("utf-8", "replace")) from None
        return parse_reply(payload, response.headers)

    async def close(self) -> None:
        await self.client.close()


def make_transport(kind: str, base_url: str, api_key: str, timeout_s: float, max_connections: int) -> Transport:
    cls = {"lean": LeanTransport, "openai": OpenAITransport}[kind]
    return cls(base_url, api_key, timeout_s, max_connections)
