"""Pacing per (endpoint, model): request, token, input-token and output-token buckets (decision 6).

Each call reserves what it will cost from every bucket at once, which gives it a place in each bucket's
queue, and sleeps until the buckets have refilled up to its place: FIFO by construction. Reported usage
corrects a reservation; `x-ratelimit-*` headers pull the buckets down to what the server says is left
(not a shared limit's: the server counts every process's calls); a call whose place moved (a correction,
or a limit shared with other processes whose pace changed) looks again when it wakes. A 429 cuts the
allowed rate multiplicatively (recovered additively on success; not for a shared limit), and a burst of
429s or a Retry-After pauses every call to the endpoint at once (a circuit breaker), not one coroutine at
a time, and holds the refill: the queue resumes at the rate.
The limiter keeps no asyncio objects, so one instance can pace coroutines in several event loops of one
process. With `share_via`, the buckets do not refill by themselves: what they owe is taken from one
bucket in Redis that every process shares (llm/limit_share.py), and a call waiting for it is woken by a
callback its own event loop gave (`wake_when_paid`) as soon as it is paid for.
"""
from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from facets.schemas.config import RateLimits

MIN_FACTOR = 0.05
RECOVERY_PER_SUCCESS = 0.01
BREAKER_WINDOW_S = 5.0
BREAKER_THRESHOLD = 5
DEFAULT_PAUSE_S = 2.0
# 429s that arrive within this long of a cut answer requests sent before it: one congestion event,
# one cut (as TCP halves once per loss window), else a burst of 64 in flight floors the rate at once.
CUT_INTERVAL_S = 1.0
# A leased bucket's guess of a call's wait: the pace it was paid at lately (weighted this much per lease),
# never below this share of the whole rate, and a call looks again this often, whatever the guess.
PACE_WEIGHT = 0.2
LEASED_RATE_FLOOR = 0.01
LEASED_RECHECK_S = 1.0
PAID_DUST = 1e-9  # of a request or a token: what a call may lack and still count as paid for
# Redis's buckets hold this share of the endpoint's burst: what processes were paid but have not sent yet
# (a busy event loop sends late) still fits in the endpoint's own bucket when it arrives, instead of 429s.
SHARED_BURST = 0.5
# A leased limiter brakes when the endpoint's headers say it has less than this much of a rate left.
BRAKE_S = 0.1

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
    """A token bucket whose level may go negative: the debt is what later callers wait for.

    `debited` counts every reservation, so a call's place is where the count stood after its own: it is
    due when the level, had nobody reserved after it, would be back at zero. A leased bucket (a limit
    shared across processes) does not refill by itself: `credit` pays in what Redis gave, and `rate` is
    only the pace seen lately, to guess how long a call will wait."""

    __slots__ = ("per_minute", "burst_s", "rate", "capacity", "level", "stamp", "debited", "leased")

    def __init__(self, per_minute: float, burst_s: float, now: float, leased: bool = False):
        self.per_minute, self.burst_s, self.leased = per_minute, burst_s, leased
        self.rate = per_minute / 60.0
        # a leased bucket starts empty (what it spends comes from Redis) and keeps what it is given back
        self.capacity = math.inf if leased else max(1.0, self.rate * burst_s)
        self.level = 0.0 if leased else self.capacity
        self.stamp = now
        self.debited = 0.0

    @property
    def full_rate(self) -> float:
        return self.per_minute / 60.0

    def refill(self, now: float) -> None:
        if now <= self.stamp:  # held (a pause): nothing refills until then
            return
        if not self.leased:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def hold(self, until: float, now: float) -> None:
        """No refill before `until` (a pause): the calls queued behind it go out at the rate afterwards,
        not all at once as soon as it ends."""
        self.refill(now)
        self.stamp = max(self.stamp, until)

    def reserve(self, amount: float, now: float, factor: float) -> tuple[Bucket, float, float]:
        """Debit `amount` / `factor`; return the call's place in the queue.

        A cut rate makes each new reservation cost more instead of slowing the refill: calls already
        queued keep their place, so a 429 does not stretch the whole queue and idle the endpoint."""
        self.refill(now)
        self.level -= amount / factor
        self.debited += amount / factor
        return self, self.debited, amount / factor

    def ahead(self, place: float) -> float:
        """The level had nobody reserved after the call at `place`: >= 0 once the call is paid for.
        Leases pay in fractions, and their float dust must not leave a call short by 1e-16 of a request:
        it would wait for a payment that `Limiter.owed`, counting it paid, never asks for."""
        ahead = self.level + (self.debited - place)
        return 0.0 if -PAID_DUST < ahead < 0 else ahead

    def due_in(self, place: float, now: float) -> float:
        """Seconds until the call at `place` may go (0: now)."""
        self.refill(now)
        ahead = self.ahead(place)
        if ahead >= 0:
            return 0.0
        if self.leased:  # paid by leases: a guess at the pace lately, and a look again soon
            return min(-ahead / max(self.rate, LEASED_RATE_FLOOR * self.full_rate), LEASED_RECHECK_S)
        return max(0.0, self.stamp - now) - ahead / self.rate

    def owed(self, keep: float, unsent: float, most_unsent: float) -> float:
        """What a leased bucket needs from Redis: its debt (> 0), up to `most_unsent` paid for and not sent
        with the `unsent` already so; or what it holds beyond `keep` (< 0)."""
        if self.level < -PAID_DUST:
            return max(0.0, min(-self.level, most_unsent - unsent))
        return -(self.level - keep) if self.level > keep else 0.0

    def credit(self, amount: float, seconds: float, asked: float) -> None:
        """Pay in what Redis gave for `seconds` of asking `asked`; the pace seen is kept for `due_in`."""
        self.level += amount
        if asked > 0 and seconds > 0:
            self.rate += PACE_WEIGHT * (amount / seconds - self.rate)


@dataclass(slots=True)
class Reservation:
    input_tokens: float
    output_tokens: float
    places: tuple[tuple[Bucket, float, float], ...] = ()  # per bucket: the call's place, and what it took
    on_paid: Callable[[], None] | None = None  # leased: called once when a lease has paid it in full

    def paid(self) -> bool:
        return all(bucket.ahead(place) >= 0 for bucket, place, _ in self.places)


class Limiter:
    def __init__(self, limits: RateLimits, clock=time.monotonic, leased: bool = False):
        self.limits = limits
        self.clock = clock
        self.leased = leased
        self._lock = threading.Lock()
        now = clock()
        self.requests, self.tokens, self.input, self.output = (
            Bucket(per_minute, limits.burst_s, now, leased) if per_minute else None
            for per_minute in (limits.rpm, limits.tpm, limits.itpm, limits.otpm))
        self.factor = 1.0
        self.lease = None  # a LimitLease when the limits are shared by several processes
        # output tokens reserved by calls not answered yet: the server charges them only when it replies
        self.outstanding_output = 0.0
        self.paused_until = 0.0
        self._next_cut = 0.0
        self._recent_429s: deque[float] = deque()
        # leased: the calls reserved, neither sent nor withdrawn, in the order of their places
        self._waiting: dict[int, Reservation] = {}

    def reserve(self, input_tokens: float, output_tokens: float) -> tuple[Reservation, float]:
        """Reserve one request's budget; returns the reservation and the seconds to wait before sending
        (then ask `due_in`: the wait may have moved meanwhile)."""
        with self._lock:
            now = self.clock()
            places = tuple(bucket.reserve(amount, now, self.factor)
                           for bucket, amount in self._charges(1.0, input_tokens, output_tokens))
            self.outstanding_output += output_tokens
            reservation = Reservation(input_tokens, output_tokens, places)
            if self.leased:
                self._waiting[id(reservation)] = reservation
            return reservation, self._due_in(reservation, now)

    def due_in(self, reservation: Reservation) -> float:
        """Seconds until a reserved call may be sent (0: now)."""
        with self._lock:
            return self._due_in(reservation, self.clock())

    def _due_in(self, reservation: Reservation, now: float) -> float:
        wait = max((bucket.due_in(place, now) for bucket, place, _ in reservation.places), default=0.0)
        return max(wait, self.paused_until - now)

    def buckets(self) -> dict[str, Bucket]:
        named = {"requests": self.requests, "tokens": self.tokens, "input": self.input, "output": self.output}
        return {name: bucket for name, bucket in named.items() if bucket is not None}

    def owed(self, keep_s: float, unsent_s: float) -> dict[str, float]:
        """Per leased bucket, what to take from the shared bucket (> 0) or give back to it (< 0), holding
        at most `unsent_s` of the whole rate paid for and not sent. Paused (429s), it takes nothing: what
        it took now would all go out at once when the pause ends."""
        with self._lock:
            paused = self.paused_until > self.clock()
            unsent = self._paid_unsent()
            owed = {name: bucket.owed(bucket.full_rate * keep_s, unsent[name], bucket.full_rate * unsent_s)
                    for name, bucket in self.buckets().items()}
            return {name: min(0.0, amount) if paused else amount for name, amount in owed.items()}

    def _paid_unsent(self) -> dict[str, float]:
        """Per bucket, what the waiting calls it has paid for in full hold. Such a call may still wait for
        another bucket (a token-heavy call, for tokens) or for an event loop busy elsewhere: either way the
        budget is not used, and taken in plenty it would all go out at once later, past the endpoint's
        burst. Every bucket serves the waiting calls in the same order, so those it paid for come first."""
        buckets = list(self.buckets().items())
        unsent = dict.fromkeys((name for name, _ in buckets), 0.0)
        paying = set(range(len(buckets)))  # the buckets whose paid-for calls are not all counted yet
        for reservation in self._waiting.values():
            for i in list(paying):
                bucket, place, amount = reservation.places[i]
                if bucket.ahead(place) < 0:
                    paying.discard(i)
                else:
                    unsent[buckets[i][0]] += amount
            if not paying:
                break
        return unsent

    def credit(self, given: dict[str, float], seconds: float, asked: dict[str, float]) -> None:
        with self._lock:
            for name, bucket in self.buckets().items():
                bucket.credit(given.get(name, 0.0), seconds, asked.get(name, 0.0))
            paid = self._newly_paid()
        _wake(paid)

    def wake_when_paid(self, reservation: Reservation, on_paid: Callable[[], None]) -> bool:
        """Leased: have `on_paid` called (from whichever thread pays) once the call is paid for in full,
        so it goes at once, not when its guessed wait ends: a call paid and asleep holds a share of the
        budget that other processes cannot use. False if it is paid already (nothing will be called)."""
        with self._lock:
            if reservation.paid():
                return False
            reservation.on_paid = on_paid
            return True

    def _newly_paid(self) -> list[Callable[[], None]]:
        """The wake-ups of waiting calls now paid in full. Every bucket pays the waiting calls in the order
        they reserved, so those paid in full come first: the look ends at the first one that is not."""
        woken = []
        for reservation in self._waiting.values():
            if not reservation.paid():
                break
            if reservation.on_paid is not None:
                woken.append(reservation.on_paid)
                reservation.on_paid = None
        return woken

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
            paid = self._newly_paid()  # a reply shorter than reserved may pay for the calls behind it
        _wake(paid)

    def sent(self, reservation: Reservation) -> None:
        """The call goes to the server now: what it reserved no longer waits."""
        with self._lock:
            self._waiting.pop(id(reservation), None)

    def withdraw(self, reservation: Reservation) -> None:
        """A call that was never sent (cancelled while it waited) gives back all it reserved, its request
        too: the calls behind it move up."""
        with self._lock:
            now = self.clock()
            self.outstanding_output = max(0.0, self.outstanding_output - reservation.output_tokens)
            for bucket, _, amount in reservation.places:
                bucket.refill(now)
                bucket.level = min(bucket.capacity, bucket.level + amount)
            self._waiting.pop(id(reservation), None)
            paid = self._newly_paid()
        _wake(paid)

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
        forget them at every reply and overspend. `answered` is the reply that brought these headers.
        A leased limiter does not clamp: its buckets hold this process's part of the limit, the server's
        remaining counts every process's calls, and clamping one to the other throws paid budget away. It
        brakes instead (`_brake`)."""
        if self.leased:
            self._brake(headers)
            return
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

    def _brake(self, headers) -> None:
        """A leased limiter's early 429. When the endpoint says it holds less than BRAKE_S of a rate, calls
        paid for but sent late by busy processes have drained it, and every call that comes a little early
        is refused, each refusal burning a request of the shared budget. Every process sees this in its
        replies and holds its sends (taking nothing from Redis) until the endpoint has refilled what Redis
        can hand out at once (SHARED_BURST of `burst_s`): what Redis banks meanwhile then goes out into a
        bucket with room for it. The hold is never longer than Redis takes to fill from empty, so it moves
        budget later and loses none, even where a small bucket brakes at nearly every reply."""
        with self._lock:
            now = self.clock()
            for bucket, kind in ((self.requests, "requests"), (self.tokens, "tokens")):
                remaining = headers.get(f"x-ratelimit-remaining-{kind}")
                if bucket is None or remaining is None:
                    continue
                try:
                    remaining = float(remaining)
                except ValueError:
                    continue
                if remaining < bucket.full_rate * BRAKE_S:
                    refill_s = bucket.burst_s * SHARED_BURST - remaining / bucket.full_rate
                    self.paused_until = max(self.paused_until, now + refill_s)

    def rate_limited(self, retry_after: float | None) -> None:
        """A 429: cut the rate; several within a few seconds pause every caller until the server's reset."""
        with self._lock:
            now = self.clock()
            # A shared limit is not cut: a dearer request would take more from the one bucket in Redis and
            # throw that budget away for every process; it follows the endpoint's pauses instead.
            if now >= self._next_cut and not self.leased:
                self.factor = max(MIN_FACTOR, self.factor * 0.5)
                self._next_cut = now + max(CUT_INTERVAL_S, retry_after or 0.0)
            self._recent_429s.append(now)
            while self._recent_429s and self._recent_429s[0] < now - BREAKER_WINDOW_S:
                self._recent_429s.popleft()
            if retry_after is not None or len(self._recent_429s) >= BREAKER_THRESHOLD:
                pause = retry_after if retry_after is not None else DEFAULT_PAUSE_S
                self.paused_until = max(self.paused_until, now + pause)
                for bucket in self.buckets().values():
                    bucket.hold(self.paused_until, now)


def _wake(paid: list[Callable[[], None]]) -> None:
    """Outside the limiter's lock: a wake-up may take the lock of another event loop."""
    for on_paid in paid:
        on_paid()
