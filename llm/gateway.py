"""Every LLM call of the factory goes through here (docs/ARCHITECTURE.md, principles 2, 3 and 5).

A call is answered from the journal when its key is there; otherwise it waits for the shared limiter,
reserves its worst-case cost, is sent with tenacity retries that honour `Retry-After`, is checked
(a reply cut by `max_tokens` is a failure; structured output is validated and asked again with the
error), and only then journaled and returned. A call that cannot be made good returns None and leaves
a `Failure` with its raw output; it never raises into the caller's shard. Only conditions that would
fail every later call raise (`RunAborted`): a bad key or model, an unreachable endpoint, the spend cap,
or most recent calls failing.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import random
import time
import weakref
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt

from facets.llm.budget import Budget
from facets.llm.context_window import overflow
from facets.llm.dialects import StructuredRequest, concrete, extract_json, structured_request
from facets.llm.dialects import json_schema_format as _json_schema_format
from facets.llm.errors import (CallError, EndpointUnreachable, FatalEndpointError, MissingCredentials, RunAborted,
                               TooManyFailures)
from facets.llm.journal import KEY_BYTES, Journal, JournalEntry, request_key
from facets.llm.limiter import Limiter
from facets.llm.limiters import Limiters
from facets.llm.pricing import PriceTable
from facets.llm.slots import CallSlots, connection_limit
from facets.llm.tokens import TokenEstimator
from facets.llm.transport import Reply, Transport, make_transport
from facets.llm.usage import Usage
from facets.schemas import Failure
from facets.schemas.records import clip_text
from facets.schemas.config import EndpointConfig, Sampling

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
UNREACHABLE = {"connection", "timeout"}
BUDGET_WAIT_S = 0.05  # how often a call waiting for the spend cap looks again
WAKE_TICK_S = 0.05  # calls the limiter holds back are let go on this grid (see `_sleep_to_tick`)
MAX_CHAIN = 32  # journaled attempts of one call a rerun walks through at most
STALL_MIN_FAILURES = 5  # attempts failed before a stall can stop a run (one slow failure is not a stall)
REFUSED_AGAIN = 3  # the same refusal this often, and nothing accepted yet: the server refuses the request itself
SIMULATOR_HINT = "or point OPENAI_BASE_URL at a local OpenAI-compatible server such as `facets simulate --port 8000` (http://127.0.0.1:8000/v1)"


class Rejected(ValueError):
    """A reply that arrived but cannot be used; `reason` names why in the failures table."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(slots=True)
class Completion(Generic[T]):
    key: str
    content: str
    value: T
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    from_journal: bool


@dataclass(slots=True, frozen=True)
class Call:
    key: str
    body: dict
    model: str
    max_tokens: int
    accept: Callable[[str], Any]
    extra_chars: int


def _acceptor(schema: type[BaseModel] | None, check: Callable[[Any], None] | None,
              extract: bool = False) -> Callable[[str], Any]:
    """Text -> accepted value; ValueError (or `Rejected`) for a reply that cannot be used. `extract`: the
    JSON is taken out of a reply in words first (the `prompt` dialect)."""

    def accept(content: str) -> Any:
        value = content
        if schema is not None:
            try:
                value = schema.model_validate_json(extract_json(content) if extract else content)
            except ValidationError as exc:
                reason = "invalid_json" if any(e["type"] == "json_invalid" for e in exc.errors()) else "schema_mismatch"
                raise Rejected(reason, _short_error(exc)) from None
        if check is not None:
            check(value)
        return value

    return accept


def json_schema_format(schema: type[BaseModel]) -> dict:
    """A strict `json_schema` response format derived from the model (llm/dialects.py)."""
    return _json_schema_format(schema)


# schema -> dialect -> what it adds to a request. Deriving a JSON schema costs ~2 ms, more than the rest
# of a call, so `prepare` derives it once per model and dialect; the dicts are shared, read-only.
_FORMATS: weakref.WeakKeyDictionary[type, dict[str, StructuredRequest]] = weakref.WeakKeyDictionary()


def _cached_format(schema: type[BaseModel], dialect: str = "json_schema") -> StructuredRequest:
    by_dialect = _FORMATS.get(schema)
    if by_dialect is None:
        by_dialect = _FORMATS[schema] = {}
    cached = by_dialect.get(dialect)
    if cached is None:
        cached = by_dialect[dialect] = structured_request(dialect, schema)
    return cached


def endpoint_transport(endpoint: EndpointConfig) -> Transport:
    """The connections to one endpoint: one per call in flight at most. Gateways that share their call
    slots share this too, so a stage's idle connections serve the others (a pool per gateway held up to
    four times the connections in flight, and each grew and shrank with its stage's bursts)."""
    if endpoint.api_key is None and endpoint.base_url is None:
        raise MissingCredentials(f"no endpoint configured: set OPENAI_API_KEY to call OpenAI, {SIMULATOR_HINT}")
    key = endpoint.api_key.get_secret_value() if endpoint.api_key else "unused"
    return make_transport(endpoint.transport, endpoint.url, key, endpoint.retries.timeout_s,
                          connection_limit(endpoint.limits), endpoint.max_reply_bytes)


class Gateway:
    def __init__(self, endpoint: EndpointConfig, journal: Journal | None = None, budget: Budget | None = None,
                 slots: CallSlots | None = None, priority: int = 0, transport: Transport | None = None,
                 limiters: Limiters | None = None):
        """`slots`, `transport` and `limiters`, when given, are shared with other gateways of the same run and
        closed by whoever made them."""
        self.endpoint = endpoint
        self.url = endpoint.url
        self.journal = journal
        self.prices = PriceTable(endpoint.prices)
        self.budget = budget or Budget(endpoint.max_cost)  # shared by the gateways of one run: one cap
        self.usage = Usage()
        self.failures: list[Failure] = []
        self.estimator = TokenEstimator()
        self._owns_transport = transport is None
        self.transport = transport or endpoint_transport(endpoint)
        # gateways of one run share the slots, so max_in_flight holds per endpoint, not per gateway
        self._slots = slots or CallSlots(endpoint.limits)
        self._owns_limiters = limiters is None
        self.limiters = limiters or Limiters()
        # gateways sharing slots take their turns by priority: a build's later stages go first, so an
        # instruction already under way finishes before new ones start and trees fill what budget is left
        self.priority = priority
        self._recent: deque[str | None] = deque(maxlen=endpoint.failure_window)  # endpoint errors, recent calls
        self._rejected: Counter[str] = Counter()  # replies that failed their checks, all calls
        self._outcomes = 0
        self._mean_output: dict[str, float] = {}
        self.aborted: RunAborted | None = None  # the first fatal condition; every later call stops on it
        self.failure_log = None  # storage.failure_log.FailureLog: failures kept as they happen
        self._last_good: float | None = None  # when a reply was last accepted (or the first call was sent)
        self._since_good: Counter[str] = Counter()  # attempts failed since then, by reason
        self._refusals: Counter[str] = Counter()  # requests the server refused, by its message
        self.check_price(endpoint.model)

    async def __aenter__(self) -> "Gateway":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_transport:
            await self.transport.close()
        if self._owns_limiters:
            self.limiters.close()
        if self.journal is not None:
            self.journal.seal()

    def check_price(self, model: str) -> None:
        if self.budget.max_cost is not None and self.prices.get(model) is None:
            raise RunAborted(
                f"max_cost is set but the price of {model!r} is unknown, so spend cannot be capped; "
                "add it to the price table (EndpointConfig.prices) or unset max_cost"
            )

    # -- the two ways to call ------------------------------------------------------------------
    async def chat(
        self,
        messages: list[dict],
        *,
        stage: str,
        key: str,
        sampling: Sampling,
        salt: object = None,
        model: str | None = None,
        check: Callable[[str], None] | None = None,
        repair_attempts: int = 2,
    ) -> Completion[str] | None:
        """Free text. `check` raises ValueError for an unusable reply, which is then asked again."""
        call = self.prepare(messages, sampling, salt=salt, model=model, check=check)
        return await self.run(call, stage, key, repair_attempts)

    async def parse(
        self,
        messages: list[dict],
        schema: type[M],
        *,
        stage: str,
        key: str,
        sampling: Sampling,
        salt: object = None,
        model: str | None = None,
        check: Callable[[M], None] | None = None,
        repair_attempts: int = 2,
    ) -> Completion[M] | None:
        """Structured output validated against `schema`; invalid JSON or schema is asked again with the error."""
        call = self.prepare(messages, sampling, schema=schema, salt=salt, model=model, check=check)
        return await self.run(call, stage, key, repair_attempts)

    def prepare(self, messages, sampling: Sampling, *, schema=None, check=None, salt=None, model=None) -> "Call":
        """Everything about a call that decides its reply, its journal key and how a reply is accepted."""
        model = model or self.endpoint.model
        self.check_price(model)
        fields = sampling.request_fields()
        if schema is None:
            body = {"model": model, "messages": messages, **fields}
            key = request_key(self.url, model, messages, None, fields, salt)
            return Call(key=key, body=body, model=model, max_tokens=sampling.max_tokens,
                        accept=_acceptor(None, check), extra_chars=0)
        # the endpoint's dialect (llm/dialects.py): its fields, its messages, its part of the journal key
        structured = _cached_format(schema, concrete(self.endpoint.structured_output))
        messages = structured.messages(messages)
        body = {"model": model, "messages": messages, **fields, **structured.fields}
        return Call(
            key=request_key(self.url, model, messages, structured.key, fields, salt),
            body=body,
            model=model,
            max_tokens=sampling.max_tokens,
            accept=_acceptor(schema, check, structured.extracts),
            extra_chars=structured.extra_chars,
        )

    # -- one logical call: journal, ask, check, repair ---------------------------------------------
    async def run(self, call: "Call", stage: str, key: str, repair_attempts: int = 2) -> Completion | None:
        cached = self.from_journal(call)
        if cached is not None:
            return cached
        self._stop_if_aborted()
        try:
            too_long = overflow(call.body["messages"], call.extra_chars, call.max_tokens, call.model,
                                self.endpoint.context_window, self.estimator)
            if too_long:  # the endpoint would refuse it, or cut it: no request, a failure of this row only
                return self.fail(stage, key, "context_window", "", too_long)
            return await self._ask(call, stage, key, repair_attempts)
        except RunAborted as exc:
            # A bad key, the spend cap, most calls failing: a shard's other calls, queued behind this one,
            # must stop without a request rather than each find out for itself (65k 401s).
            self.aborted = self.aborted or exc
            raise

    def _stop_if_aborted(self) -> None:
        if self.aborted is not None:
            raise type(self.aborted)(str(self.aborted))  # a fresh exception: re-raising one grows its traceback

    async def repair(self, call: "Call", stage: str, key: str, rejected: "Rejected", content: str,
                     attempts: int = 2) -> Completion | None:
        """Ask again online from a reply already rejected (one a batch returned): the original request,
        paid once, is not sent again; the accepted reply is journaled under the original key."""
        self._stop_if_aborted()
        try:
            return await self._ask(call, stage, key, attempts - 1, last=(content, rejected.reason, str(rejected)))
        except RunAborted as exc:
            self.aborted = self.aborted or exc
            raise

    async def _ask(self, call: "Call", stage: str, key: str, repair_attempts: int,
                   last: tuple[str, str, str] | None = None) -> Completion | None:
        """The attempts of one logical call: the request, then repairs (the rejected reply sent back with why).
        Every reply is journaled as it comes, accepted or not, so a rerun walks the chain from the journal
        without paying and goes on where it stopped; a call that failed gets `1 + repair_attempts` paid
        attempts more on a rerun (a failure is retried, a reply is never paid twice)."""
        body, attempt_key = call.body, call.key
        content, reason, detail = last or ("", "", "")
        if last is not None:
            body, attempt_key = _repaired(call, content, reason, detail)
        paid, seen = 0, set()
        while True:
            entry = self._journaled(attempt_key, seen)
            if entry is not None:
                reply, latency = _reply_of(entry), entry.latency_s
            elif paid > repair_attempts:
                break
            else:
                paid += 1
                if self._last_good is None:
                    self._last_good = time.monotonic()
                try:
                    reply, latency = await self._send(body, call.model, call.max_tokens, call.extra_chars)
                except CallError as exc:
                    self._refused_again(exc)
                    return self.fail(stage, key, exc.reason, exc.raw, str(exc), unreachable=exc.reason in UNREACHABLE,
                                     endpoint_error=True)
            seen.add(attempt_key)
            try:
                value = self.judge(call, reply)
            except Rejected as exc:
                content, reason, detail = reply.contents[0], exc.reason, str(exc)
                if entry is None:
                    self.record(call, reply, None, latency, "online", key=attempt_key, rejected=exc.reason)
                    try:
                        self._attempt_failed(exc.reason)
                    except RunAborted:  # the run stops on this reply: it is this call's failure too
                        self._keep(stage, key, reason, content, detail)
                        raise
                body, attempt_key = _repaired(call, content, reason, detail)
                continue
            if entry is None:
                self.record(call, reply, value, latency, "online", key=attempt_key)  # before anything else can go wrong
            else:
                self.usage.journal_hits += 1
            self._record_outcome(None)
            return Completion(call.key, reply.contents[0], value, reply.prompt_tokens, reply.completion_tokens, latency,
                              entry is not None)
        return self.fail(stage, key, reason, content, detail)

    def _journaled(self, attempt_key: str, seen: set[str]) -> JournalEntry | None:
        """This attempt's reply if a run before paid for it. Each step of a chain is taken from the journal
        once: a model that repeated itself would lead the walk round in a circle, so a step seen again is sent."""
        if self.journal is None or attempt_key in seen or len(seen) >= MAX_CHAIN:
            return None
        return self.journal.get(attempt_key)

    # A reply cut by max_tokens is never a row of ours; a model under evaluation may set this False.
    length_is_failure = True

    @classmethod
    def judge(cls, call: "Call", reply) -> Any:
        """The accepted value of a reply, or `Rejected` (with `length_is_failure`, a reply cut by max_tokens)."""
        if cls.length_is_failure and reply.finish_reasons[0] == "length":
            raise Rejected("length", f"reply cut at max_tokens={call.max_tokens}")
        try:
            return call.accept(reply.contents[0])
        except Rejected:
            raise
        except ValueError as exc:
            raise Rejected("rejected", str(exc)) from None

    def from_journal(self, call: "Call") -> Completion | None:
        entry = self.journal.get(call.key) if self.journal is not None else None
        if entry is None or entry.rejected is not None:
            return None  # a rejected reply: `_ask` goes on from it
        try:
            value = call.accept(entry.content)
        except ValueError:
            return None  # a check that got stricter since: ask again
        self.usage.journal_hits += 1
        usage = entry.usage
        return Completion(call.key, entry.content, value, usage.prompt_tokens, usage.completion_tokens, entry.latency_s, True)

    def record(self, call: "Call", reply, value, latency: float, source: str, key: str | None = None,
               rejected: str | None = None) -> None:
        """Journal a reply before it counts as done (never pay twice): an accepted one, or with `rejected`
        (its reason) one that failed its checks, which a rerun takes up again rather than pay for."""
        if self.journal is None:
            return
        parsed = value.model_dump(mode="json") if isinstance(value, BaseModel) else None
        self.journal.put(
            JournalEntry(
                key=key or call.key,
                model=call.model,
                content=reply.contents[0],
                finish_reason=reply.finish_reasons[0],
                parsed=parsed,
                usage={
                    "prompt_tokens": reply.prompt_tokens,
                    "completion_tokens": reply.completion_tokens,
                    "cached_tokens": reply.cached_tokens,
                },
                latency_s=latency,
                source=source,
                rejected=rejected,
            )
        )

    # -- one HTTP request, retried ---------------------------------------------------------------
    async def _send(self, body: dict, model: str, max_tokens: int, extra_chars: int):
        retries = self.endpoint.retries
        try:
            async with asyncio.timeout(retries.deadline_s):
                # The first attempt goes without tenacity: most calls need no other, and setting up the
                # retry machinery costs more than the rest of the gateway's own work on a call.
                try:
                    return await self._attempt(body, model, max_tokens, extra_chars)
                except CallError as exc:
                    if not _retryable(exc) or retries.max_attempts < 2:
                        raise
                    first_wait = self._delay(1, exc)
                await asyncio.sleep(first_wait)
                # Attempts 2..max_attempts: tenacity counts from 1 here, hence the + 1.
                retrying = AsyncRetrying(
                    stop=stop_after_attempt(retries.max_attempts - 1),
                    wait=lambda state: self._delay(state.attempt_number + 1, state.outcome.exception()),
                    retry=retry_if_exception(_retryable),
                    reraise=True,
                )
                async for attempt in retrying:
                    with attempt:
                        self.usage.retries += 1
                        return await self._attempt(body, model, max_tokens, extra_chars)
        except TimeoutError:
            raise CallError("deadline", f"no good reply within the call deadline of {retries.deadline_s:g}s") from None

    def _delay(self, failed_attempts: int, error: BaseException | None) -> float:
        """Exponential with full jitter, but never sooner than the server's Retry-After."""
        retries = self.endpoint.retries
        ceiling = min(retries.backoff_max_s, retries.backoff_initial_s * 2 ** (failed_attempts - 1))
        told = getattr(error, "retry_after", None) or 0.0
        return max(told, random.uniform(0, ceiling))

    async def _attempt(self, body: dict, model: str, max_tokens: int, extra_chars: int):
        limiter = self.limiters.get(self.url, model, self.endpoint.limits)
        raw_estimate = self.estimator.raw(body["messages"], extra_chars)
        input_tokens = self.estimator.estimate(body["messages"], extra_chars)
        price = self.prices.get(model)
        worst_case = price.cost(input_tokens, max_tokens) if price else 0.0
        async with self._admitted(limiter, model, input_tokens, max_tokens, worst_case) as turn:
            self._stop_if_aborted()  # the run stopped while this call waited for its turn
            turn.send()
            started = time.perf_counter()
            self.usage.requests += 1
            try:
                reply = await self.transport.chat(body)
            except CallError as exc:
                self._count_error(exc, limiter)
                self._attempt_failed(exc.reason)
                raise
        latency = time.perf_counter() - started
        self._slots.observe(latency)
        cost = price.cost(reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) if price else None
        turn.settle(cost or 0.0, reply)
        self.estimator.observe(raw_estimate, reply.prompt_tokens)
        self._learn_output(model, reply.completion_tokens)
        self.usage.add_reply(reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens, cost, latency)
        return reply, latency

    @contextlib.asynccontextmanager
    async def _admitted(self, limiter: Limiter, model: str, input_tokens: int, max_tokens: int,
                        worst_case: float) -> AsyncIterator["_Turn"]:
        """A call's turn to go out: its place in the limiter's pace, its worst case held from the spend cap and
        an in-flight slot, taken in that order. Whatever ends the call (cancelled while waiting, the run
        stopped, a failed request), what it holds is given back; the slot is free again once the body ends."""
        turn = _Turn(limiter, self.budget)
        try:
            async with self._slots.reserving.slot(self.priority):
                # guessed once its turn to reserve comes: replies seen while it queued inform the guess
                output_tokens = min(max_tokens, self._mean_output.get(model, max_tokens / 2))
                turn.reservation, wait = limiter.reserve(input_tokens, output_tokens)
                while wait > 0:  # its place may have moved while it slept: it looks again
                    await (_until_paid(limiter, turn.reservation, wait) if limiter.leased else _sleep_to_tick(wait))
                    wait = limiter.due_in(turn.reservation)
                while (pause := limiter.pause_remaining()) > 0:
                    await asyncio.sleep(pause)
                while (held := self.budget.reserve(worst_case)) is None:  # calls in flight hold the rest of the cap
                    await asyncio.sleep(BUDGET_WAIT_S)
                turn.held = held
                await self._slots.in_flight.acquire(self.priority)
        except BaseException:
            turn.give_back()
            raise
        try:
            yield turn
        except BaseException:
            turn.give_back()
            raise
        finally:
            self._slots.in_flight.release()

    def _count_error(self, exc: CallError, limiter) -> None:
        if exc.status == 429:
            self.usage.rate_limited += 1
            limiter.rate_limited(exc.retry_after)
        else:
            self.usage.errors[exc.reason] += 1

    def _attempt_failed(self, reason: str) -> None:
        """The early stop that always stops: whatever fails (429s without end, 5xx, bodies that do not parse,
        replies that fail their checks) and however few calls are in flight, no accepted reply for `stall_s`
        while attempts kept failing ends the run. Retries and repairs never reach the failure window then."""
        now = time.monotonic()
        if self._last_good is None:
            self._last_good = now
        self._since_good[reason] += 1
        stalled = now - self._last_good
        if stalled >= self.endpoint.stall_s and self._since_good.total() >= STALL_MIN_FAILURES:
            self._stop(f"no reply was accepted in {stalled:.0f} s while {self._since_good.total()} attempts failed",
                       self._since_good)

    def _refused_again(self, exc: CallError) -> None:
        """A request the server refuses (4xx, or a 5xx that says the request is invalid) the same way again and
        again, with nothing accepted yet, is not a passing fault: stop with the server's own words."""
        if exc.retryable or exc.status is None or self.usage.ok:
            return
        message = str(exc)
        self._refusals[message] += 1
        if self._refusals[message] >= REFUSED_AGAIN:
            raise FatalEndpointError(f"{self.url} refuses the request ({self._refusals[message]} calls, nothing "
                                     f"accepted): {message[:300]}")

    def _learn_output(self, model: str, completion_tokens: int) -> None:
        mean = self._mean_output.get(model)
        self._mean_output[model] = completion_tokens if mean is None else mean + 0.05 * (completion_tokens - mean)

    # -- failures and the early stop -------------------------------------------------------------
    def fail(self, stage: str, key: str, reason: str, raw: str, detail: str, unreachable: bool = False,
             endpoint_error: bool = False) -> None:
        self._keep(stage, key, reason, raw, detail)
        if unreachable and self.usage.ok == 0:
            raise EndpointUnreachable(
                f"{self.url} could not be reached after {self.endpoint.retries.max_attempts} attempts ({detail}); "
                f"check OPENAI_BASE_URL, {SIMULATOR_HINT}"
            )
        if reason != "rate_limited":
            self._record_outcome(reason, endpoint_error)
        return None

    def _keep(self, stage: str, key: str, reason: str, raw: str, detail: str) -> None:
        """A failure, kept as it happens (the live failure log) and counted."""
        failure = Failure(stage=stage, key=key, reason=reason, raw_output=raw or "", detail=detail[:2000])
        if self.failure_log is not None:
            self.failure_log.add(failure)
        self.failures.append(failure)
        self.usage.failures[reason] += 1

    def _record_outcome(self, failure_reason: str | None, endpoint_error: bool = False) -> None:
        """Two early stops. The endpoint failing (5xx, timeouts, dropped connections) is judged on the
        last `failure_window` calls, to stop soon after it breaks. Replies that fail their checks are judged
        over all calls so far: they fail after their repairs, at the back of the queue, so a recent window
        would see only them at the end of every stage."""
        self._recent.append(failure_reason if endpoint_error else None)
        if failure_reason is not None and not endpoint_error:
            self._rejected[failure_reason] += 1
        self._outcomes += 1
        if failure_reason is None:
            self._last_good, self._since_good = time.monotonic(), Counter()
            return  # only a failure trips the stop: a good reply still in flight when it trips reaches its caller
        window, rate = self._recent.maxlen, self.endpoint.max_failure_rate
        if endpoint_error and len(self._recent) == window:
            failed = Counter(r for r in self._recent if r is not None)
            if sum(failed.values()) > rate * window:
                self._stop(f"{sum(failed.values())} of the last {window} calls failed", failed)
        rejected = sum(self._rejected.values())
        if not endpoint_error and self._outcomes >= window and rejected > rate * self._outcomes:
            self._stop(f"{rejected} of the {self._outcomes} calls so far failed", self._rejected)

    @staticmethod
    def _stop(what: str, reasons: Counter) -> None:
        top = ", ".join(f"{r} x{n}" for r, n in reasons.most_common(3))
        raise TooManyFailures(
            f"stopped early: {what} ({top}); failures are kept with their raw outputs, and a rerun retries only those"
        )

    def drain_failures(self) -> list[Failure]:
        failures, self.failures = self.failures, []
        return failures


async def _sleep_to_tick(wait: float) -> None:
    """Sleep at least `wait`, until the next multiple of WAKE_TICK_S on the loop's clock. Calls that the
    limiter paces a few ms apart then wake the loop once per tick, not once each: at 100 calls/s a
    wake-up costs more CPU than the call. Later, never sooner, so the limits still hold."""
    loop = asyncio.get_running_loop()
    now = loop.time()
    await asyncio.sleep(math.ceil((now + wait) / WAKE_TICK_S) * WAKE_TICK_S - now)


async def _until_paid(limiter, reservation, wait: float) -> None:
    """A shared limit's call: sleep until a lease has paid for it, or `wait` at the most (the lease thread
    is late); paid already, it waits out a pause as any call does."""
    loop = asyncio.get_running_loop()
    paid = loop.create_future()

    def wake() -> None:  # in the lease thread, mostly
        try:
            loop.call_soon_threadsafe(_set_done, paid)
        except RuntimeError:  # the loop closed meanwhile: nobody waits
            pass

    if limiter.wake_when_paid(reservation, wake):
        await asyncio.wait((paid,), timeout=wait)
    else:
        await _sleep_to_tick(wait)


def _set_done(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _retryable(error: BaseException) -> bool:
    return isinstance(error, CallError) and error.retryable


def _short_error(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'reply'}: {e['msg']}" for e in exc.errors()[:8])


def _repaired(call: Call, content: str, reason: str, detail: str) -> tuple[dict, str]:
    """The body of the repair attempt after a rejected reply, and its own journal key."""
    turns = _repair_turns(content, reason, detail)
    digest = hashlib.blake2b(call.key.encode() + orjson.dumps(turns), digest_size=KEY_BYTES).hexdigest()
    return {**call.body, "messages": [*call.body["messages"], *turns]}, digest


def _reply_of(entry: JournalEntry) -> Reply:
    contents = entry.content if isinstance(entry.content, list) else [entry.content]
    reasons = entry.finish_reason if isinstance(entry.finish_reason, list) else [entry.finish_reason or ""]
    usage = entry.usage
    return Reply(contents, reasons, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)


# The rejected reply sent back in a repair turn, at most: a whole max_tokens=4096 reply fits twice over,
# a runaway one is not paid for again in full on every repair.
REPAIR_ECHO_BYTES = 32 * 1024


def _repair_turns(content: str, reason: str, detail: str) -> list[dict]:
    if reason == "length":
        ask = "That reply was cut off by the length limit. Answer again, complete and shorter."
    else:
        ask = f"That reply could not be used ({reason}: {detail}). Answer again, fixing exactly this."
    return [{"role": "assistant", "content": clip_text(content, REPAIR_ECHO_BYTES)}, {"role": "user", "content": ask}]


async def run_bounded(calls: Iterable[Awaitable[T]] | Iterable[Callable[[], Awaitable[T]]], limit: int) -> list[T]:
    """Run many calls with at most `limit` coroutines alive, so memory is bounded by `limit`, not by the queue."""
    results: list[T] = []
    iterator = iter(enumerate(calls))
    slots: dict[int, T] = {}

    async def worker() -> None:
        for index, call in iterator:
            slots[index] = await (call() if callable(call) else call)

    await asyncio.gather(*(worker() for _ in range(limit)))
    results.extend(slots[i] for i in sorted(slots))
    return results


class _Turn:
    """What one admitted call holds: a limiter reservation and a part of the spend cap."""

    __slots__ = ("limiter", "budget", "reservation", "held", "sent")

    def __init__(self, limiter: Limiter, budget: Budget):
        self.limiter, self.budget = limiter, budget
        self.reservation = self.held = None
        self.sent = False

    def send(self) -> None:
        self.limiter.sent(self.reservation)
        self.sent = True

    def settle(self, cost: float, reply: Reply) -> None:
        """An answered call pays what it cost and tells the limiter what it used."""
        self.budget.settle(self.held, cost)
        self.limiter.observe_headers(reply.headers, self.reservation)
        self.limiter.settle(self.reservation, reply.prompt_tokens, reply.completion_tokens)

    def give_back(self) -> None:
        """Unsent, its place goes back to the pace; sent and failed, the limiter counts the request only."""
        if self.reservation is not None:
            (self.limiter.release if self.sent else self.limiter.withdraw)(self.reservation)
        if self.held is not None:
            self.budget.settle(self.held, 0.0)
