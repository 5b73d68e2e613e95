"""Pacing per (endpoint, model): request, token, input-token and output-token buckets (decision 6).

Each call reserves what it will cost from every bucket at once and sleeps until the buckets have
refilled enough: no polling, and a FIFO order by construction. Reported usage corrects a reservation;
`x-ratelimit-*` headers pull the buckets down to what the server says is left. A 429 cuts the allowed
rate multiplicatively (recovered additively on success), and a burst of 429s pauses every call to the
endpoint at once (a circuit breaker), not one coroutine at a time. The limiter keeps no asyncio objects,
so one instance can pace coroutines in several event loops of one process.
"""
from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass

from facets.schemas.config import RateLimits

MIN_FACTOR = 0.05
RECOVERY_PER_SUCCESS = 0.01
BREAKER_WINDOW_S = 5.0
BREAKER_THRESHOLD = 5
DEFAULT_PAUSE_S = 2.0
# 429s that arrive within this long of a cut answer requests sent before it: one congestion event,
# one cut (as TCP halves once per loss window), else a burst of 64 in flight floors the rate at once.
CUT_INTERVAL_S = 1.0

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str | None) -> float | None:
    """OpenAI's reset durations: '1s', '6m0s', '120ms', '0.5s' or a bare number of seconds."""
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        return sum(float(n) * _UNIT_S[u] for n, u in parts) if parts else None


class Bucket:
    """A token bucket whose level may go negative: the debt is what later callers wait for."""

    __slots__ = ("per_minute", "burst_s", "rate", "capacity", "level", "stamp")

    def __init__(self, per_minute: float, burst_s: float, now: float):
        self.per_minute, self.burst_s = per_minute, burst_s
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = now

    def scale(self, share: float, now: float) -> None:
        """Pace at `share` of the configured limit (this process's part of a limit shared by several)."""
        self.refill(now)
        rate = self.per_minute * share / 60.0
        if self.level < 0 and rate > 0:  # calls already queued keep their times: later ones wait for them
            self.level *= self.rate / rate  # at the new rate, so the debt lasts as long as it now should
        self.rate = rate
        self.capacity = max(1.0, self.rate * self.burst_s)
        self.level = min(self.level, self.capacity)

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def reserve(self, amount: float, now: float, factor: float) -> float:
        """Debit `amount` / `factor`; return seconds until the balance is non-negative again.

        A cut rate makes each new reservation cost more instead of slowing the refill: calls already
        queued keep their place, so a 429 does not stretch the whole queue and idle the endpoint."""
        self.refill(now)
        self.level -= amount / factor
        return 0.0 if self.level >= 0 else -self.level / self.rate


@dataclass(slots=True)
class Reservation:
    input_tokens: float
    output_tokens: float


class Limiter:
    def __init__(self, limits: RateLimits, clock=time.monotonic):
        self.limits = limits
        self.clock = clock
        self._lock = threading.Lock()
        now = clock()
        self.requests = Bucket(limits.rpm, limits.burst_s, now) if limits.rpm else None
        self.tokens = Bucket(limits.tpm, limits.burst_s, now) if limits.tpm else None
        self.input = Bucket(limits.itpm, limits.burst_s, now) if limits.itpm else None
        self.output = Bucket(limits.otpm, limits.burst_s, now) if limits.otpm else None
        self.factor = 1.0
        self.share = None  # a LimitShare when the limits are split across processes
        # output tokens reserved by calls not answered yet: the server charges them only when it replies
        self.outstanding_output = 0.0
        self.reserved = 0  # requests reserved so far (what a shared limit's member says it uses)
        self.paused_until = 0.0
        self._next_cut = 0.0
        self._recent_429s: deque[float] = deque()

    def reserve(self, input_tokens: float, output_tokens: float) -> tuple[Reservation, float]:
        """Reserve one request's budget; returns the reservation and the seconds to wait before sending."""
        with self._lock:
            now = self.clock()
            wait = 0.0
            for bucket, amount in self._charges(1.0, input_tokens, output_tokens):
                wait = max(wait, bucket.reserve(amount, now, self.factor))
            wait = max(wait, self.paused_until - now)
            self.outstanding_output += output_tokens
            self.reserved += 1
        return Reservation(input_tokens, output_tokens), wait

    def _buckets(self) -> list[Bucket]:
        return [b for b in (self.requests, self.tokens, self.input, self.output) if b is not None]

    def set_share(self, share: float) -> None:
        with self._lock:
            now = self.clock()
            for bucket in self._buckets():
                bucket.scale(share, now)

    def hold(self, seconds: float) -> None:
        """Send nothing for `seconds`, then pace from an empty bucket: a debt, not a pause, so the calls
        that queue meanwhile leave one by one at the rate, never as one burst when it ends."""
        with self._lock:
            now = self.clock()
            for bucket in self._buckets():
                bucket.refill(now)
                bucket.level = min(bucket.level, 0.0) - bucket.rate * seconds

    def waiting(self) -> bool:
        """Calls are reserved and not yet due to be sent: some bucket is in debt (requests or tokens)."""
        with self._lock:
            now = self.clock()
            for bucket in self._buckets():
                bucket.refill(now)
            return any(bucket.level < 0 for bucket in self._buckets())

    def pause_remaining(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def settle(self, reservation: Reservation, input_tokens: int, output_tokens: int, success: bool = True) -> None:
        """Correct the token buckets by the difference between reserved and reported usage."""
        with self._lock:
            now = self.clock()
            self.outstanding_output = max(0.0, self.outstanding_output - reservation.output_tokens)
            for bucket, delta in self._charges(
                0.0, input_tokens - reservation.input_tokens, output_tokens - reservation.output_tokens
            ):
                bucket.refill(now)
                bucket.level = min(bucket.capacity, bucket.level - delta)
            if success:
                self.factor = min(1.0, self.factor + RECOVERY_PER_SUCCESS)

    def release(self, reservation: Reservation) -> None:
        """A request that never reached the server (or was refused with 429) gives its tokens back;
        it is not a success, so it does not raise a rate that a 429 has just cut."""
        self.settle(reservation, 0, 0, success=False)

    def _charges(self, requests: float, input_tokens: float, output_tokens: float):
        if self.requests is not None and requests:
            yield self.requests, requests
        if self.tokens is not None:
            yield self.tokens, input_tokens + output_tokens
        if self.input is not None:
            yield self.input, input_tokens
        if self.output is not None:
            yield self.output, output_tokens

    def observe_headers(self, headers, answered: Reservation | None = None) -> None:
        """Never believe we have more budget left than the server says we do.

        The server's remaining tokens do not yet count the replies still being written (it charges output
        when it replies), while our bucket does: those are taken off what it says, or the bucket would
        forget them at every reply and overspend. `answered` is the reply that brought these headers."""
        with self._lock:
            now = self.clock()
            pending = self.outstanding_output - (answered.output_tokens if answered else 0.0)
            for bucket, kind, unanswered in ((self.requests, "requests", 0.0), (self.tokens, "tokens", pending),
                                             (self.output, "output-tokens", pending)):
                remaining = headers.get(f"x-ratelimit-remaining-{kind}")
                if bucket is None or remaining is None:
                    continue
                try:
                    remaining = float(remaining) - max(0.0, unanswered)
                except ValueError:
                    continue
                bucket.refill(now)
                if remaining < bucket.level:
                    bucket.level = remaining

    def rate_limited(self, retry_after: float | None) -> None:
        """A 429: cut the rate; several within a few seconds pause every caller until the server's reset."""
        with self._lock:
            now = self.clock()
            if now >= self._next_cut:
                self.factor = max(MIN_FACTOR, self.factor * 0.5)
                self._next_cut = now + max(CUT_INTERVAL_S, retry_after or 0.0)
            self._recent_429s.append(now)
            while self._recent_429s and self._recent_429s[0] < now - BREAKER_WINDOW_S:
                self._recent_429s.popleft()
            if retry_after is not None or len(self._recent_429s) >= BREAKER_THRESHOLD:
                pause = retry_after if retry_after is not None else DEFAULT_PAUSE_S
                self.paused_until = max(self.paused_until, now + pause)


_SHARED: dict[tuple[str, str], Limiter] = {}
_SHARED_LOCK = threading.Lock()


def shared_limiter(endpoint: str, model: str, limits: RateLimits) -> Limiter:
    """One limiter per (endpoint, model) per process, shared by every gateway that calls it; with
    `limits.share_via`, one limit split across the processes that call it (llm/limit_share.py)."""
    with _SHARED_LOCK:
        limiter = _SHARED.get((endpoint, model))
        if limiter is None or limiter.limits != limits:
            if limiter is not None and limiter.share is not None:
                limiter.share.close()
            limiter = _SHARED[(endpoint, model)] = Limiter(limits)
            if limits.share_via:
                from facets.llm.limit_share import BEAT_S, LimitShare

                limiter.share = LimitShare(limits.share_via, f"{endpoint}|{model}", limiter.set_share,
                                           waiting=limiter.waiting, reserved=lambda: limiter.reserved,
                                           full_rate=limits.rpm / 60.0)
                if limiter.share.members > 1:  # the others lower their share at their next beat
                    limiter.hold(1.5 * BEAT_S)
        return limiter
