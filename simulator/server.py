"""Loopback OpenAI-compatible simulator: the endpoint for tests, the demo and benchmarks.

It serves the parts of the OpenAI API the factory uses (chat completions, models, files, batches, and
raw-prompt completions for models under evaluation)
with real token counts, RPM/TPM token buckets, seeded faults and endpoint-side counters (`/stats`),
so a test counts what was paid for at the endpoint, not in our own code. It only ever runs when
started on purpose; nothing falls back to it.

Replies are deterministic per (canonical request body, seed); faults are drawn per arrival, so a
retried identical request can succeed.
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import queue
import random
import re
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from facets.simulator.fake_text import (
    break_instance,
    count_tokens,
    cut_half,
    cut_tokens,
    off_spec_prose,
    prose,
    quoted_phrases,
    reply_length,
    schema_instance,
    sentences,
)

ONE_PARAGRAPH = re.compile(r"\b(?:one|a single) paragraph\b", re.IGNORECASE)
FAULT_KINDS = ("http_500", "http_503", "drop", "hang", "truncated_json", "invalid_json", "off_spec", "length")
TRANSPORT_FAULTS = frozenset({"http_500", "http_503", "drop", "hang"})
CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
JUDGE_MARK = "[RESULT]"  # a prose request containing it is answered "Feedback: ... [RESULT] k", k in 1..5
DEFAULT_MODEL = "facets-sim"
# Names the simulator's URL in the environment of the runs a command points at it (`facets build` without a
# key, `facets server --simulate`), so the release card of a build on that URL says its text is simulated.
SIMULATED_URL_ENV = "FACETS_SIMULATED_URL"
LISTENING = "simulator listening on"
URL_RE = re.compile(LISTENING + r" (\S+)")
MAX_N = 128
BATCH_YIELD_EVERY = 256  # lines processed between yields to the event loop
MAX_UPLOAD = 256 * 1024 * 1024
SCHEMA_IN_PROMPT = re.compile(r"JSON schema:\s*", re.IGNORECASE)  # "... matching this JSON schema: {...}"
# llama-cpp-python's answer to a response format other than text or json_object: pydantic's words, HTTP 500
LLAMA_CPP_PYTHON_REFUSAL = ("1 validation error for CreateChatCompletionRequest\nresponse_format.type\n  Input "
                            "should be 'text' or 'json_object' [type=literal_error, input_value={kind!r}, "
                            "input_type=str]")


class SimulatorConfig(BaseModel):
    """Everything `facets simulate` takes; each field is the flag `--field-name`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field("127.0.0.1", description="interface to bind")
    port: int = Field(0, ge=0, le=65535, description="port to bind; 0 picks a free one")
    rpm: int = Field(0, ge=0, description="requests per minute; 0 is unlimited")
    tpm: int = Field(0, ge=0, description="input + output tokens per minute; 0 is unlimited")
    itpm: int = Field(0, ge=0, description="input tokens per minute; 0 is unlimited")
    otpm: int = Field(0, ge=0, description="output tokens per minute; 0 is unlimited")
    burst_s: float = Field(10.0, gt=0, description="bucket capacity, in seconds of each per-minute limit")
    latency_ms: float = Field(0.0, ge=0, description="delay before each admitted reply")
    jitter_ms: float = Field(0.0, ge=0, description="latency varies uniformly by plus or minus this")
    fault_rate: float = Field(0.0, ge=0, le=1, description="fault rate split evenly over the kinds not named in --faults")
    faults: dict[str, float] = Field(default_factory=dict, description=f"per-kind rates, kind=rate,... ({', '.join(FAULT_KINDS)})")
    hang_s: float = Field(600.0, ge=0, description="how long a hang fault holds the connection before dropping it")
    seed: int = Field(0, description="seed for content and for the fault stream")
    api_key: str | None = Field(None, description="when set, any other bearer token gets 401")
    structured_output: Literal["any", "json_schema", "json_object", "guided_json", "prompt"] = Field(
        "any", description="the one way of asking for JSON served, the others answered as real servers do: "
                           "json_schema (OpenAI), json_object with a schema (llama-cpp-python: a json_schema "
                           "gets HTTP 500), guided_json (vLLM's extra field), prompt (formats ignored, JSON in a "
                           "```json fence when the prompt gives the schema); any serves them all")
    no_usage: bool = Field(False, description="replies carry no usage, as some local servers")
    no_rate_headers: bool = Field(False, description="replies carry no x-ratelimit-* headers")
    null_finish_reason: bool = Field(False, description="every reply's finish_reason is null")
    models: tuple[str, ...] = Field((), description="accepted models, a,b,... (listed by /v1/models); empty accepts "
                                                      "any and lists none")
    response_tokens: int = Field(200, ge=1, description="mean length of prose replies, in tokens")
    batch_delay_s: float = Field(1.0, ge=0, description="time a batch spends in_progress")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: Any) -> Any:
        return tuple(m.strip() for m in value.split(",") if m.strip()) if isinstance(value, str) else value

    @field_validator("faults", mode="before")
    @classmethod
    def _parse_faults(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        pairs = (item.split("=", 1) for item in value.split(",") if item.strip())
        try:
            return {kind.strip(): float(rate) for kind, rate in pairs}
        except ValueError as exc:
            raise ValueError("faults must read kind=rate,kind=rate") from exc

    @model_validator(mode="after")
    def _check_faults(self) -> SimulatorConfig:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {', '.join(FAULT_KINDS)}")
        rates = self.fault_rates()
        if any(r < 0 for r in rates.values()) or sum(rates.values()) > 1 + 1e-9:
            raise ValueError("fault rates must be non-negative and sum to at most 1")
        return self

    def fault_rates(self) -> dict[str, float]:
        """Rate per kind: --faults as given, --fault-rate shared by the other kinds."""
        others = [k for k in FAULT_KINDS if k not in self.faults]
        share = self.fault_rate / len(others) if others else 0.0
        return {k: self.faults.get(k, share) for k in FAULT_KINDS}

    def cli_args(self) -> list[str]:
        """The `facets simulate` flags that reproduce this config."""
        args: list[str] = []
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value == field.get_default(call_default_factory=True):
                continue
            if isinstance(value, bool):  # a switch: its flag alone
                args.append("--" + name.replace("_", "-"))
                continue
            if isinstance(value, dict):
                value = ",".join(f"{k}={v}" for k, v in value.items())
            elif isinstance(value, tuple):
                value = ",".join(value)
            args += ["--" + name.replace("_", "-"), str(value)]
        return args


# --- rate limits ----------------------------------------------------------------------------

def format_duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset format: "120ms", "1s", "7.66s", "6m0s", "1h2m3s"."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    return f"{hours}h{text}" if hours else text


class TokenBucket:
    """Continuous refill up to `limit * burst_s / 60`. The level may go negative (output tokens are
    charged after the fact); a request is admitted once its cost, capped at capacity, fits."""

    __slots__ = ("limit", "rate", "capacity", "level", "stamp")

    def __init__(self, per_minute: int, burst_s: float) -> None:
        self.limit = per_minute
        self.rate = per_minute / 60
        self.capacity = self.rate * burst_s
        self.level = self.capacity
        self.stamp = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, cost: float) -> float:
        return max(0.0, (min(cost, self.capacity) - self.level) / self.rate)

    def reset_s(self) -> float:
        return (self.capacity - self.level) / self.rate


# bucket name (as in the x-ratelimit-* headers) -> (config field, 429 error type, words for the message)
BUCKETS = {
    "requests": ("rpm", "requests", "requests per min (RPM)"),
    "tokens": ("tpm", "tokens", "tokens per min (TPM)"),
    "input-tokens": ("itpm", "input_tokens", "input tokens per min (ITPM)"),
    "output-tokens": ("otpm", "output_tokens", "output tokens per min (OTPM)"),
}


class RateLimiter:
    """The endpoint's limits: input tokens are charged at admission, output tokens on reply."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.buckets = {name: TokenBucket(getattr(config, spec[0]), config.burst_s)
                        for name, spec in BUCKETS.items() if getattr(config, spec[0])}

    def admit(self, prompt_tokens: int) -> tuple[float, str] | None:
        """Charge and return None, or return (seconds to wait, bucket name) without charging."""
        if not self.buckets:
            return None
        now = time.monotonic()
        # output-tokens admits while it is not in debt: the reply's size is unknown yet
        need = {"requests": 1, "tokens": prompt_tokens, "input-tokens": prompt_tokens, "output-tokens": 1}
        wait, worst = 0.0, ""
        for name, bucket in self.buckets.items():
            bucket.refill(now)
            if (w := bucket.wait_s(need[name])) > wait:
                wait, worst = w, name
        if wait > 0:
            return wait, worst
        for name, bucket in self.buckets.items():
            bucket.level -= 0 if name == "output-tokens" else need[name]
        return None

    def charge_output(self, tokens: int) -> None:
        for name in ("tokens", "output-tokens"):
            if name in self.buckets:
                self.buckets[name].level -= tokens

    def headers(self) -> dict[str, str]:
        """x-ratelimit-{limit,remaining,reset}-<bucket> for each configured limit. remaining is
        what the bucket holds now (at most limit * burst_s / 60); reset is the time until it is full."""
        now = time.monotonic()
        out = {}
        for name, bucket in self.buckets.items():
            bucket.refill(now)
            out[f"x-ratelimit-limit-{name}"] = str(bucket.limit)
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = format_duration(bucket.reset_s())
        return out


# --- counters -------------------------------------------------------------------------------

def max_in_window(times: list[float], window_s: float) -> int:
    """Most events in any half-open window of `window_s` seconds (`times` ascending)."""
    best = start = 0
    for end, t in enumerate(times):
        while t - times[start] >= window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


class Stats:
    """Endpoint-side counters: what was asked, admitted, faulted and paid for."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.started = time.monotonic()
        self.sync: Counter[str] = Counter()
        self.batch: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.batch_faults: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.limited_by: Counter[str] = Counter()  # 429s by the bucket that refused
        self.answered: set[bytes] = set()
        self.peers: set[Any] = set()  # the client end of each connection a request came on
        self.admitted: list[float] = []
        self.refused: list[tuple[float, str]] = []  # when each 429 was answered (as `admitted`), by which bucket
        self.paid_twice = self.prompt_tokens = self.completion_tokens = 0

    def arrived(self, request: web.Request) -> None:
        self.sync["requests"] += 1
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))

    def admit(self) -> None:
        self.admitted.append(time.monotonic() - self.started)

    def fault(self, kind: str, batch: bool) -> None:
        (self.batch_faults if batch else self.faults)[kind] += 1

    def paid(self, digest: bytes, prompt: int, completion: int, fault: str | None, batch: bool) -> None:
        """A 200 reply: billed whatever its content; only a clean one counts as ok."""
        counters = self.batch if batch else self.sync
        counters["paid"] += 1
        self.prompt_tokens += prompt
        self.completion_tokens += completion
        if fault:
            self.fault(fault, batch)
            return
        counters["ok"] += 1
        if digest in self.answered:
            self.paid_twice += 1
        self.answered.add(digest)

    def snapshot(self, window_s: float = 60.0, timestamps: bool = False) -> dict[str, Any]:
        out = {
            "requests": self.sync["requests"],
            "ok": self.sync["ok"],
            "paid": self.sync["paid"],
            "rate_limited": self.sync["rate_limited"],
            "rate_limited_by": dict(sorted(self.limited_by.items())),
            "admitted": len(self.admitted),
            "faults": {k: self.faults[k] for k in FAULT_KINDS},
            "errors": dict(sorted(self.errors.items())),
            "distinct_request_hashes": len(self.answered),
            "connections": len(self.peers),
            "paid_twice": self.paid_twice,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "window_s": window_s,
            "max_ok_in_window": max_in_window(self.admitted, window_s),
            "batch": {**{k: self.batch[k] for k in ("batches", "lines", "ok", "paid", "failed")},
                      "faults": {k: self.batch_faults[k] for k in FAULT_KINDS}},
        }
        if timestamps:
            out["admitted_timestamps"] = [round(t, 6) for t in self.admitted]
            out["rate_limited_timestamps"] = [[round(t, 6), bucket] for t, bucket in self.refused]
        return out


# --- replies --------------------------------------------------------------------------------

def body_digest(body: dict) -> bytes:
    return hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def message_text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def prompt_tokens(messages: list[dict]) -> int:
    return sum(count_tokens(message_text(m)) for m in messages)


def _format_kind(body: dict) -> str | None:
    fmt = body.get("response_format")
    return fmt.get("type") if isinstance(fmt, dict) else None


def reply_mode(body: dict, serves: str = "any") -> tuple[str, dict | None]:
    """("schema", schema), ("object", None), ("fenced", schema) or ("prose", None): how a server that
    serves one structured-output dialect (`any`: all of them) answers `body`; what it does not take it
    ignores (the refusals are `refused_dialect`'s)."""
    fmt, kind = body.get("response_format") or {}, _format_kind(body)
    if kind == "json_schema" and serves in ("any", "json_schema"):
        schema = (fmt.get("json_schema") or {}).get("schema")
        return ("schema", schema) if isinstance(schema, dict) else ("object", None)
    if kind == "json_object" and serves in ("any", "json_schema", "json_object"):
        schema = fmt.get("schema") if serves != "json_schema" else None  # OpenAI's json_object has no schema
        return ("schema", schema) if isinstance(schema, dict) else ("object", None)
    if isinstance(body.get("guided_json"), dict) and serves in ("any", "guided_json"):
        return "schema", body["guided_json"]
    if serves in ("any", "prompt") and (schema := schema_in_prompt(body.get("messages") or [])) is not None:
        return "fenced", schema
    return "prose", None


def schema_in_prompt(messages: list[dict]) -> dict | None:
    """The JSON schema a prompt gives ("... this JSON schema: {...}"), the last one said."""
    decoder = json.JSONDecoder()
    for message in reversed(messages):
        text = message_text(message)
        for match in reversed(list(SCHEMA_IN_PROMPT.finditer(text))):
            try:
                schema, _ = decoder.raw_decode(text, match.end())
            except ValueError:
                continue
            if isinstance(schema, dict):
                return schema
    return None


def refused_dialect(body: dict, serves: str) -> tuple[int, str, str, str | None, str | None] | None:
    """How a server that serves one dialect refuses a request in another, as the real ones do."""
    kind = _format_kind(body)
    if serves == "json_object" and kind not in (None, "text", "json_object"):
        return 500, LLAMA_CPP_PYTHON_REFUSAL.format(kind=kind), "internal_server_error", None, None
    if serves == "json_schema" and "guided_json" in body:
        return 400, "Unrecognized request argument supplied: guided_json", "invalid_request_error", None, None
    if serves == "guided_json" and kind not in (None, "text"):
        return (400, f"response_format of type {kind!r} is not supported; use guided_json", "BadRequestError",
                None, "response_format")
    return None


def invalid_request(body: Any, models: tuple[str, ...],
                    serves: str = "any") -> tuple[int, str, str, str | None, str | None] | None:
    """(status, message, type, code, param) when a chat body would be refused, else None."""
    if not isinstance(body, dict):
        return 400, "The request body must be a JSON object.", "invalid_request_error", None, None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return 400, "You must provide a model parameter.", "invalid_request_error", None, "model"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        return 400, "'messages' must be a non-empty array of message objects.", "invalid_request_error", None, "messages"
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N):
        return 400, f"'n' must be an integer from 1 to {MAX_N}.", "invalid_request_error", None, "n"
    if body.get("stream"):
        return 400, "The simulator does not stream.", "invalid_request_error", None, "stream"
    if refused := refused_dialect(body, serves):
        return refused
    if models and model not in models:
        return (404, f"The model `{model}` does not exist or you do not have access to it.",
                "invalid_request_error", "model_not_found", None)
    return None


def completion(body: dict, digest: bytes, fault: str | None, prompt: int,
               config: SimulatorConfig, reply_id: str) -> tuple[dict, int]:
    """The chat.completion object for `body` and its completion token count."""
    rng = random.Random(digest + b"/" + str(config.seed).encode())
    mode, schema = reply_mode(body, config.structured_output)
    asked = _last_user_text(body["messages"]) if mode == "prose" else ""
    graded = JUDGE_MARK in asked  # a judge prompt: feedback, then the score line it asks for
    phrases = [] if graded else quoted_phrases(asked)
    one_paragraph = bool(ONE_PARAGRAPH.search(asked))  # a model follows "in one paragraph"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    choices, total = [], 0
    for index in range(body.get("n") or 1):
        text, finish, tokens = _choice(rng, mode, schema, phrases, fault, limit, config.response_tokens, one_paragraph,
                                       graded)
        total += tokens
        choices.append({"index": index, "finish_reason": finish, "logprobs": None,
                        "message": {"role": "assistant", "content": text, "refusal": None}})
    return {
        "id": reply_id, "object": "chat.completion", "created": int(time.time()), "model": body["model"],
        "choices": choices, "system_fingerprint": "fp_facets_sim",
        "usage": {"prompt_tokens": prompt, "completion_tokens": total, "total_tokens": prompt + total,
                  "prompt_tokens_details": {"cached_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0}},
    }, total


def _last_user_text(messages: list[dict]) -> str:
    return next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")


def _choice(rng: random.Random, mode: str, schema: dict | None, phrases: list[str], fault: str | None,
            limit: int | None, mean_tokens: int, one_paragraph: bool = False, graded: bool = False) -> tuple[str, str, int]:
    """(content, finish_reason, completion tokens) for one choice; cut at `limit` like a real server."""
    text = _content(rng, mode, schema, phrases, fault, mean_tokens, one_paragraph)
    if graded and mode == "prose" and fault != "off_spec":  # off-spec: a judge reply without its score
        text = f"Feedback: {text} {JUDGE_MARK} {rng.randint(1, 5)}"
    if fault == "truncated_json":
        text = cut_half(text) if mode == "prose" else text[: len(text) // 2]
    tokens = count_tokens(text)
    if fault == "length":
        limit = max(1, min(limit or tokens, tokens // 2))
    if limit and tokens > limit:
        return cut_tokens(text, limit), "length", limit
    return text, "stop", tokens


def _content(rng: random.Random, mode: str, schema: dict | None, phrases: list[str],
             fault: str | None, mean_tokens: int, one_paragraph: bool = False) -> str:
    if mode == "prose":
        target = reply_length(rng, mean_tokens)
        if fault == "off_spec":
            return off_spec_prose(rng, target)
        text = prose(rng, target, phrases, one_paragraph)
        return orjson.dumps({"response": text}).decode() if fault == "invalid_json" else text
    if mode == "fenced":  # a model told the schema in words: the JSON in a fence, a word around it
        instance = _content(rng, "schema", schema, phrases, fault, mean_tokens)
        return f"Here is the JSON object:\n\n```json\n{instance}\n```"
    if mode == "schema":
        instance = schema_instance(schema, rng, dull=fault == "off_spec")
        if fault == "invalid_json":
            instance = break_instance(instance, schema, rng)
    else:
        instance = {"response": "" if fault == "off_spec" else sentences(rng, 1, 3)}
        if fault == "invalid_json":
            instance = [instance]
    return orjson.dumps(instance).decode()


def _prompt_as_chat(body: object) -> dict | tuple:
    """A `/v1/completions` body as the chat request it is answered as; an error tuple if it has no prompt."""
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
        return (400, "'prompt' must be a string.", "invalid_request_error", None, "prompt")
    chat_body = {k: v for k, v in body.items() if k != "prompt"}
    chat_body["messages"] = [{"role": "user", "content": body["prompt"]}]
    return chat_body


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, headers=headers, content_type="application/json")


def _seconds_text(ms: int) -> str:
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".")


# --- batches --------------------------------------------------------------------------------

def parse_batch_file(data: bytes, endpoint: str) -> tuple[list[dict], dict | None]:
    """The request lines of a batch input file, or the first problem as a BatchError."""
    lines: list[dict] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return [], _batch_error("invalid_json_line", "This line is not parseable as valid JSON.", number)
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str) \
                or not isinstance(line.get("body"), dict):
            return [], _batch_error("invalid_request", "Each line needs a string custom_id and an object body.", number)
        if line.get("method") != "POST" or line.get("url") != endpoint:
            return [], _batch_error("invalid_url", f"Each line must be a POST to {endpoint}.", number)
        if line["custom_id"] in seen:
            return [], _batch_error("duplicate_custom_id", "The custom_id for this request is a duplicate.", number)
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines:
        return [], _batch_error("empty_file", "The input file has no requests.", None)
    return lines, None


def _batch_error(code: str, message: str, line: int | None) -> dict:
    return {"code": code, "message": message, "param": None, "line": line}


def _new_batch(file_id: str, endpoint: str, window: str, metadata: dict | None) -> dict:
    now = int(time.time())
    nulls = ("output_file_id", "error_file_id", "errors", "in_progress_at", "finalizing_at", "completed_at",
             "failed_at", "expired_at", "cancelling_at", "cancelled_at", "model", "usage")
    return {"id": f"batch_{uuid.uuid4().hex}", "object": "batch", "endpoint": endpoint,
            "input_file_id": file_id, "completion_window": window, "status": "validating",
            "created_at": now, "expires_at": now + 86_400, "metadata": metadata,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, **dict.fromkeys(nulls)}


def _usage(prompt: int, completion: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion}


# --- the server -----------------------------------------------------------------------------

class Simulator:
    """The aiohttp application and its state. `start()` and `close()` run on its event loop."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.limiter = RateLimiter(config)
        # One stream, drawn per arrival: fault kind and jitter.
        self.arrivals = random.Random(f"arrivals:{config.seed}")
        self.rates = [(k, r) for k, r in config.fault_rates().items() if r > 0]
        self.serial = itertools.count(1)
        self.files: dict[str, tuple[dict, bytes]] = {}
        self.batches: dict[str, dict] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.closing: asyncio.Event | None = None
        self.runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Bind and serve; returns the base URL (".../v1")."""
        self.closing = asyncio.Event()
        self.runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.config.host, self.config.port, backlog=4096).start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    async def close(self) -> None:
        self.closing.set()
        for task in self.tasks.values():
            task.cancel()
        await self.runner.cleanup()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_UPLOAD)
        app.add_routes([
            web.post(CHAT_PATH, self.chat),
            web.post(COMPLETIONS_PATH, self.text_completion),
            web.get("/v1/models", self.list_models),
            web.get("/v1/models/{model}", self.get_model),
            web.post("/v1/files", self.create_file),
            web.get("/v1/files", self.list_files),
            web.get("/v1/files/{file_id}", self.get_file),
            web.delete("/v1/files/{file_id}", self.delete_file),
            web.get("/v1/files/{file_id}/content", self.file_content),
            web.post("/v1/batches", self.create_batch),
            web.get("/v1/batches", self.list_batches),
            web.get("/v1/batches/{batch_id}", self.get_batch),
            web.post("/v1/batches/{batch_id}/cancel", self.cancel_batch),
            web.get("/stats", self.get_stats),
            web.post("/stats/reset", self.reset_stats),
        ])
        return app

    # -- helpers --

    def error(self, status: int, message: str, type_: str, code: str | None = None,
              param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
        self.stats.errors[str(status)] += 1
        return json_response(error_body(message, type_, code, param), status, headers)

    def unauthorized(self, request: web.Request) -> web.Response | None:
        key = self.config.api_key
        if key is None or request.headers.get("Authorization") == f"Bearer {key}":
            return None
        return self.error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")

    def draw_fault(self) -> str | None:
        if not self.rates:
            return None
        u = self.arrivals.random()
        for kind, rate in self.rates:
            u -= rate
            if u < 0:
                return kind
        return None

    def draw_delay(self) -> float:
        jitter = self.config.jitter_ms
        delay = self.config.latency_ms + (self.arrivals.uniform(-jitter, jitter) if jitter else 0.0)
        return max(0.0, delay) / 1000

    async def sleep(self, seconds: float) -> None:
        """Sleep, cut short when the server shuts down."""
        try:
            await asyncio.wait_for(self.closing.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def rate_headers(self) -> dict[str, str]:
        return {} if self.config.no_rate_headers else self.limiter.headers()

    def bare(self, payload: dict) -> dict:
        """A reply as a server without usage or finish reasons sends it, when so configured."""
        if self.config.no_usage:
            payload.pop("usage", None)
        if self.config.null_finish_reason:
            for choice in payload["choices"]:
                choice["finish_reason"] = None
        return payload

    def reply_id(self, prefix: str) -> str:
        return f"{prefix}{next(self.serial):08x}{uuid.uuid4().hex[:16]}"

    # -- chat --

    async def chat(self, request: web.Request) -> web.StreamResponse:
        admitted = await self.admit_chat(request, lambda body: body)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        body, chat_body, fault, prompt = admitted
        digest = body_digest(body)
        request_id = self.reply_id("req_")
        payload, tokens = completion(body, digest, fault, prompt, self.config, self.reply_id("chatcmpl-"))
        self.limiter.charge_output(tokens)
        self.stats.paid(digest, prompt, tokens, fault, batch=False)
        return json_response(self.bare(payload), headers={**self.rate_headers(), "x-request-id": request_id})

    async def text_completion(self, request: web.Request) -> web.StreamResponse:
        """`/v1/completions` (raw-prompt servers such as vLLM): the prompt is answered as one user turn."""
        admitted = await self.admit_chat(request, _prompt_as_chat)
        if isinstance(admitted, web.StreamResponse):
            return admitted
        body, chat_body, fault, prompt = admitted
        digest = body_digest(body)
        payload, tokens = completion(chat_body, digest, fault, prompt, self.config, self.reply_id("cmpl-"))
        payload["object"] = "text_completion"
        payload["choices"] = [{"index": c["index"], "text": c["message"]["content"], "finish_reason": c["finish_reason"],
                               "logprobs": None} for c in payload["choices"]]
        self.limiter.charge_output(tokens)
        self.stats.paid(digest, prompt, tokens, fault, batch=False)
        headers = {**self.rate_headers(), "x-request-id": self.reply_id("req_")}
        return json_response(self.bare(payload), headers=headers)

    async def admit_chat(self, request: web.Request, as_chat) -> web.StreamResponse | tuple[dict, dict, str | None, int]:
        """What every online request goes through before it is answered: auth, a valid body, the rate
        limits, the latency and the transport faults. Returns the response that ends it early, or
        (body, the body as a chat request, the content fault, prompt tokens)."""
        self.stats.arrived(request)
        fault, delay = self.draw_fault(), self.draw_delay()
        if denied := self.unauthorized(request):
            return denied
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self.error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        chat_body = as_chat(body)
        if isinstance(chat_body, tuple):
            return self.error(*chat_body)
        if problem := invalid_request(chat_body, self.config.models, self.config.structured_output):
            return self.error(*problem)
        prompt = prompt_tokens(chat_body["messages"])
        if refused := self.limiter.admit(prompt):
            return self.rate_limited(*refused, body["model"])
        self.stats.admit()
        if delay:
            await asyncio.sleep(delay)
        if fault in TRANSPORT_FAULTS:
            return await self.transport_fault(request, fault)
        return body, chat_body, fault, prompt

    def rate_limited(self, wait_s: float, bucket: str, model: str) -> web.Response:
        self.stats.sync["rate_limited"] += 1
        self.stats.limited_by[bucket] += 1
        self.stats.refused.append((time.monotonic() - self.stats.started, bucket))
        field, type_, words = BUCKETS[bucket]
        ms = max(1, math.ceil(wait_s * 1000))
        message = (f"Rate limit reached for {model} on {words}: Limit {getattr(self.config, field)}. "
                   f"Please try again in {format_duration(ms / 1000)}.")
        headers = {**self.rate_headers(), "retry-after": _seconds_text(ms), "retry-after-ms": str(ms)}
        return self.error(429, message, type_, "rate_limit_exceeded", headers=headers)

    async def transport_fault(self, request: web.Request, fault: str) -> web.StreamResponse:
        self.stats.fault(fault, batch=False)
        if fault == "http_500":
            return self.error(500, "The server had an error while processing your request.", "server_error",
                              headers=self.rate_headers())
        if fault == "http_503":
            return self.error(503, "The server is overloaded or not ready yet.", "server_error",
                              headers=self.rate_headers())
        if fault == "hang":
            await self.sleep(self.config.hang_s)
        if request.transport is not None:
            request.transport.close()  # no response at all; aiohttp drops the unsent one
        return web.Response()

    # -- models --

    def model_object(self, model: str) -> dict:
        return {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "facets-simulator"}

    async def list_models(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        # Accepting any model, it lists none: a client that checks the list against the models it names
        # (a build's preflight) then takes any name, gpt-4o-mini as well as facets-sim.
        return json_response({"object": "list", "data": [self.model_object(m) for m in self.config.models]})

    async def get_model(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        model = request.match_info["model"]
        if self.config.models and model not in self.config.models:
            return self.error(404, f"The model `{model}` does not exist or you do not have access to it.",
                              "invalid_request_error", "model_not_found")
        return json_response(self.model_object(model))

    # -- files --

    def store_file(self, filename: str, data: bytes, purpose: str) -> dict:
        meta = {"id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(data),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                "status": "processed", "expires_at": None, "status_details": None}
        self.files[meta["id"]] = (meta, data)
        return meta

    def missing(self, kind: str, key: str) -> web.Response:
        return self.error(404, f"No such {kind}: {key}", "invalid_request_error", "not_found")

    async def create_file(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or not isinstance(purpose, str) or not purpose:
            return self.error(400, "A file and a purpose are required.", "invalid_request_error")
        return json_response(self.store_file(upload.filename, upload.file.read(), purpose))

    async def list_files(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        return self.page(request, [meta for meta, _ in reversed(self.files.values())])

    async def get_file(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return self.missing("File", file_id)
        return json_response(self.files[file_id][0])

    async def delete_file(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        file_id = request.match_info["file_id"]
        if self.files.pop(file_id, None) is None:
            return self.missing("File", file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    async def file_content(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        file_id = request.match_info["file_id"]
        if file_id not in self.files:
            return self.missing("File", file_id)
        return web.Response(body=self.files[file_id][1], content_type="application/octet-stream")

    def page(self, request: web.Request, items: list[dict]) -> web.Response:
        """An OpenAI cursor page over `items` (newest first): ?limit=&after=."""
        try:
            limit = int(request.query.get("limit", 20))
        except ValueError:
            return self.error(400, "limit must be an integer.", "invalid_request_error", param="limit")
        after = request.query.get("after")
        if after:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        data = items[:limit]
        return json_response({"object": "list", "data": data, "has_more": len(items) > limit,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})

    # -- batches --

    async def create_batch(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return self.error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        file_id = body.get("input_file_id")
        if file_id not in self.files:
            return self.missing("File", str(file_id))
        if body.get("endpoint") != CHAT_PATH:
            return self.error(400, f"The simulator batches only {CHAT_PATH}.", "invalid_request_error",
                              param="endpoint")
        if body.get("completion_window") != "24h":
            return self.error(400, "completion_window must be 24h.", "invalid_request_error",
                              param="completion_window")
        batch = _new_batch(file_id, CHAT_PATH, "24h", body.get("metadata"))
        self.batches[batch["id"]] = batch
        self.stats.batch["batches"] += 1
        self.tasks[batch["id"]] = asyncio.create_task(self.run_batch(batch))
        return json_response(batch)

    async def list_batches(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        return self.page(request, list(reversed(self.batches.values())))

    async def get_batch(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches:
            return self.missing("Batch", batch_id)
        return json_response(self.batches[batch_id])

    async def cancel_batch(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        batch_id = request.match_info["batch_id"]
        batch = self.batches.get(batch_id)
        if batch is None:
            return self.missing("Batch", batch_id)
        if batch["status"] not in ("validating", "in_progress"):
            return self.error(400, f"Cannot cancel a batch with status {batch['status']}.", "invalid_request_error")
        self.tasks[batch_id].cancel()
        now = int(time.time())
        batch.update(status="cancelled", cancelling_at=now, cancelled_at=now)
        return json_response(batch)

    async def run_batch(self, batch: dict) -> None:
        try:
            lines, problem = parse_batch_file(self.files[batch["input_file_id"]][1], batch["endpoint"])
            if problem:
                batch.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": [problem]})
                return
            batch.update(status="in_progress", in_progress_at=int(time.time()),
                         request_counts={"total": len(lines), "completed": 0, "failed": 0})
            await asyncio.sleep(self.config.batch_delay_s)
            await self.answer_batch(batch, lines)
        finally:
            self.tasks.pop(batch["id"], None)

    async def answer_batch(self, batch: dict, lines: list[dict]) -> None:
        outputs, failures = [], []
        used_prompt = used_completion = 0
        for index, line in enumerate(lines):
            if index % BATCH_YIELD_EVERY == BATCH_YIELD_EVERY - 1:
                await asyncio.sleep(0)
            record, tokens = self.batch_line(line)
            if tokens is None:
                failures.append(record)
                continue
            outputs.append(record)
            used_prompt += tokens[0]
            used_completion += tokens[1]
        self.finish_batch(batch, outputs, failures, _usage(used_prompt, used_completion))

    def batch_line(self, line: dict) -> tuple[dict, tuple[int, int] | None]:
        """One output or error record, with (prompt, completion) tokens when it was answered."""
        self.stats.batch["lines"] += 1
        body, request_id = line["body"], self.reply_id("req_")
        if problem := invalid_request(body, self.config.models, self.config.structured_output):
            return self.batch_failure(line, request_id, *problem[:4]), None
        fault = self.draw_fault()
        if fault in TRANSPORT_FAULTS:
            self.stats.fault(fault, batch=True)
            status = 503 if fault == "http_503" else 500
            return self.batch_failure(line, request_id, status, "The server had an error.", "server_error", None), None
        digest, prompt = body_digest(body), prompt_tokens(body["messages"])
        payload, tokens = completion(body, digest, fault, prompt, self.config, self.reply_id("chatcmpl-"))
        self.stats.paid(digest, prompt, tokens, fault, batch=True)
        record = {"id": self.reply_id("batch_req_"), "custom_id": line["custom_id"], "error": None,
                  "response": {"status_code": 200, "request_id": request_id, "body": payload}}
        return record, (prompt, tokens)

    def batch_failure(self, line: dict, request_id: str, status: int, message: str, type_: str,
                      code: str | None) -> dict:
        self.stats.batch["failed"] += 1
        return {"id": self.reply_id("batch_req_"), "custom_id": line["custom_id"], "error": None,
                "response": {"status_code": status, "request_id": request_id,
                             "body": error_body(message, type_, code)}}

    def finish_batch(self, batch: dict, outputs: list[dict], failures: list[dict], usage: dict) -> None:
        def jsonl(records: list[dict], kind: str) -> str | None:
            if not records:
                return None
            data = b"".join(orjson.dumps(r) + b"\n" for r in records)
            return self.store_file(f"{batch['id']}_{kind}.jsonl", data, "batch_output")["id"]

        now = int(time.time())
        batch.update(status="completed", finalizing_at=now, completed_at=now,
                     output_file_id=jsonl(outputs, "output"), error_file_id=jsonl(failures, "error"),
                     request_counts={"total": len(outputs) + len(failures), "completed": len(outputs),
                                     "failed": len(failures)},
                     usage=usage)

    # -- stats --

    async def get_stats(self, request: web.Request) -> web.Response:
        try:
            window = float(request.query.get("window", 60))
        except ValueError:
            return self.error(400, "window must be a number of seconds.", "invalid_request_error", param="window")
        timestamps = request.query.get("timestamps", "") in ("1", "true", "yes")
        return json_response(self.stats.snapshot(window, timestamps))

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return json_response({"reset": True})


# --- running it -----------------------------------------------------------------------------

class SimulatorServer:
    """The simulator on a background thread with its own event loop, for tests and benchmarks:

        with run_simulator(SimulatorConfig(rpm=600)) as sim:
            client = openai.OpenAI(base_url=sim.base_url, api_key="x")
            ...
            sim.stats()["ok"]
    """

    def __init__(self, config: SimulatorConfig | None = None, **overrides: Any) -> None:
        self.config = config.model_copy(update=overrides) if config else SimulatorConfig(**overrides)
        self.simulator = Simulator(self.config)
        self.base_url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="facets-simulator", daemon=True)

    @property
    def url(self) -> str:
        """The server root (where /stats lives)."""
        return self.base_url.removesuffix("/v1")

    def start(self) -> SimulatorServer:
        self._thread.start()
        try:
            self.base_url = self._call(self.simulator.start())
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self.simulator.close())
        self._shutdown_loop()

    def stats(self, window_s: float = 60.0, timestamps: bool = False) -> dict[str, Any]:
        return self._call(self._on_loop(self.simulator.stats.snapshot, window_s, timestamps))

    def reset_stats(self) -> None:
        self._call(self._on_loop(self.simulator.stats.reset))

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    async def _on_loop(fn: Any, *args: Any) -> Any:
        return fn(*args)

    def _call(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


@contextmanager
def run_simulator(config: SimulatorConfig | None = None, **overrides: Any) -> Iterator[SimulatorServer]:
    """A started SimulatorServer for the duration of the block."""
    with SimulatorServer(config, **overrides) as server:
        yield server


class SimulatorProcess:
    """`facets simulate` as a child process (for tests that need the endpoint out of process).
    The URL is read from the line the command prints once it listens."""

    def __init__(self, config: SimulatorConfig | None = None, startup_timeout_s: float = 30.0,
                 **overrides: Any) -> None:
        self.config = config.model_copy(update=overrides) if config else SimulatorConfig(**overrides)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[str] | None = None
        self.base_url = ""

    @property
    def url(self) -> str:
        return self.base_url.removesuffix("/v1")

    def command(self) -> list[str]:
        return [sys.executable, "-m", "facets.flows.cli", "simulate", *self.config.cli_args()]

    def start(self) -> SimulatorProcess:
        self.process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                        text=True, bufsize=1)
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(lines,), daemon=True).start()
        try:
            self.base_url = self._await_url(lines)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stats(self, window_s: float = 60.0, timestamps: bool = False) -> dict[str, Any]:
        query = f"?window={window_s}" + ("&timestamps=1" if timestamps else "")
        with urllib.request.urlopen(f"{self.url}/stats{query}", timeout=30) as reply:
            return orjson.loads(reply.read())

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _pump(self, lines: queue.Queue[str | None]) -> None:
        """Forward stdout lines until EOF (keeps the child from blocking on a full pipe)."""
        for line in self.process.stdout:
            lines.put(line)
        lines.put(None)

    def _await_url(self, lines: queue.Queue[str | None]) -> str:
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"simulator did not report its URL in {self.startup_timeout_s}s") from None
            if line is None:
                raise RuntimeError(f"simulator exited with status {self.process.wait()} before listening")
            if match := URL_RE.search(line):
                return match.group(1)
