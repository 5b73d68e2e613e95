"""Two ways to send a chat completion, with one reply shape and one error vocabulary.

`LeanTransport` is aiohttp + orjson: the same request and reply as the openai SDK at a fraction of its
client CPU (decision 17). `OpenAITransport` goes through `openai.AsyncOpenAI` with its own retries off.
Both raise `CallError` subclasses; `status_error` is the single mapping from HTTP status to error.
"""
from __future__ import annotations

import asyncio
import importlib
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping, Protocol

import aiohttp
import orjson

from facets.llm.errors import BadRequest, CallError, FatalEndpointError, RateLimited, ReplyTooLarge
from facets.schemas.config import DEFAULT_MAX_REPLY_BYTES
from facets.llm.tokens import CHARS_PER_TOKEN, TokenEstimator

RETRYABLE_STATUS = {408, 409, 429} | set(range(500, 600))
FATAL_STATUS = {401: "authentication failed", 403: "permission denied", 404: "not found"}
# The SDK's own switch (`with_streaming_response` sets it) to hand over a reply with its body unread
UNREAD_BODY = {"headers": {"X-Stainless-Raw-Response": "stream"}}
# A 5xx that says the request itself is wrong (llama-cpp-python answers a response format it does not know
# with a 500 and pydantic's words): sending it again would be refused again.
INVALID_REQUEST = re.compile(
    r"validation error|input should be|field required|extra inputs are not permitted|invalid request|"
    r"invalid_request|not supported|unsupported|unrecognized|unknown (field|parameter|argument)|must be one of",
    re.IGNORECASE)


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
    if status in RETRYABLE_STATUS and not (status >= 500 and INVALID_REQUEST.search(message)):
        return CallError(f"http_{status}", message, status, retry_after(headers))
    return BadRequest(f"http_{status}", message, status)


def parse_reply(payload: Mapping, headers: Mapping[str, str]) -> Reply:
    choices = payload.get("choices") or []
    if not choices:
        raise CallError("malformed_reply", "no choices in the reply", raw=str(payload)[:2000])
    usage = payload.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    contents = [(c.get("message") or {}).get("content") or "" for c in choices]
    return Reply(
        contents=contents,
        # some servers send null: a reply that says something ended normally, an empty one is unknown
        finish_reasons=[c.get("finish_reason") or ("stop" if text else "") for c, text in zip(choices, contents)],
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
        headers=headers,
    )


def with_usage_estimate(reply: Reply, body: dict) -> Reply:
    """Token counts a server did not report (no `usage`, as some local servers), estimated from the text
    sent and received, so the limiter, the spend cap and the usage report count the call and not 0."""
    if not reply.prompt_tokens:
        formats = {k: body[k] for k in ("response_format", "guided_json") if k in body}
        reply.prompt_tokens = TokenEstimator().estimate(body.get("messages") or [],
                                                        len(orjson.dumps(formats)) if formats else 0)
    if not reply.completion_tokens:
        reply.completion_tokens = sum(round(len(text) / CHARS_PER_TOKEN) for text in reply.contents)
    return reply


RAW_HEAD_CHARS = 2000  # of a reply that cannot be used, kept in its failure
READ_CHUNK_BYTES = 64 * 1024


async def read_at_most(chunks: AsyncIterator[bytes], limit: int) -> tuple[bytes, bool]:
    """The body, up to `limit` bytes, and whether that was all of it; a longer one is not read further,
    so a runaway reply costs `limit` bytes of memory, not its size."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(parts)[:limit], False
    return b"".join(parts), True


def too_large(head: bytes, limit: int) -> ReplyTooLarge:
    return ReplyTooLarge("reply_too_large", f"the reply passed max_reply_bytes={limit:,}; the rest was not read",
                         raw=head[:RAW_HEAD_CHARS].decode("utf-8", "replace"))


class LeanTransport:
    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES):
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_connections = max_connections
        self.max_reply_bytes = max_reply_bytes
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(connector=connector, json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    async def chat(self, body: dict) -> Reply:
        payload, headers = await self.post_json(self.url, body)
        return with_usage_estimate(parse_reply(payload, headers), body)

    async def post_json(self, url: str, body: dict) -> tuple[dict, Any]:
        """POST `body`, return the JSON reply and its headers; HTTP and network errors as `CallError`."""
        try:
            async with self._client().post(url, data=orjson.dumps(body), headers=self.headers, timeout=self.timeout) as response:
                raw, whole = await read_at_most(response.content.iter_chunked(READ_CHUNK_BYTES), self.max_reply_bytes)
                if not whole:
                    response.close()  # the unread rest goes with the connection, never back to the pool
                headers = response.headers
                if response.status != 200:
                    raise status_error(response.status, _error_message(raw), headers, self.base_url)
                if not whole:
                    raise too_large(raw, self.max_reply_bytes)
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
    """The SDK hands over the reply unread and it is read here up to `max_reply_bytes`; an error status's
    body (4xx, 5xx) is read whole by the SDK before it raises."""

    def __init__(self, base_url: str, api_key: str, timeout_s: float, max_connections: int,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES):
        import httpx
        import openai

        self.openai = openai
        self.raw_reply = httpx.Response  # `cast_to` for the reply as it came
        self.max_reply_bytes = max_reply_bytes
        self.base_url = base_url.rstrip("/")
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=timeout_s)

    async def chat(self, body: dict) -> Reply:
        openai = self.openai
        try:
            # The SDK's own request path (auth, headers, timeouts, error types) with the body as built:
            # `chat.completions.create` would walk the whole request (schema included) to transform it
            # and build a typed reply only for us to dump it again, a third of this transport's CPU.
            response = await self.client.post("/chat/completions", body=body, cast_to=self.raw_reply,
                                              options=UNREAD_BODY)
        except openai.APIStatusError as exc:
            raise status_error(exc.status_code, exc.message, exc.response.headers, self.base_url) from None
        except openai.APITimeoutError:
            raise CallError("timeout", "no reply within the timeout") from None
        except openai.APIConnectionError as exc:
            raise CallError("connection", str(exc)) from None
        raw = await self._read(response)
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise CallError("malformed_reply", "reply is not JSON", raw=raw[:2000].decode("utf-8", "replace")) from None
        return with_usage_estimate(parse_reply(payload, response.headers), body)

    async def _read(self, response: Any) -> bytes:
        http = importlib.import_module(type(response).__module__.partition(".")[0])  # httpx or httpx2
        try:
            raw, whole = await read_at_most(response.aiter_bytes(READ_CHUNK_BYTES), self.max_reply_bytes)
        except http.TimeoutException:
            raise CallError("timeout", "no whole reply within the timeout") from None
        except http.RequestError as exc:
            raise CallError("connection", f"{type(exc).__name__}: {exc}") from None
        finally:
            await response.aclose()
        if not whole:
            raise too_large(raw, self.max_reply_bytes)
        return raw

    async def close(self) -> None:
        await self.client.close()


def make_transport(kind: str, base_url: str, api_key: str, timeout_s: float, max_connections: int,
                   max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> Transport:
    cls = {"lean": LeanTransport, "openai": OpenAITransport}[kind]
    return cls(base_url, api_key, timeout_s, max_connections, max_reply_bytes)
