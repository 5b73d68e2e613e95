"""How many calls one endpoint may have going: in flight (sent, unanswered) and reserving (holding a
limiter reservation while they wait their turn).

In flight is what fills the rate budget: by Little's law a rate of R requests a second at a latency of
L seconds needs R x L calls in flight. A fixed bound either caps the rate below the limit (64 in flight
at 0.5 s is 128/s, short of a 12,000 RPM budget) or lets thousands go at once; with `max_in_flight`
unset the bound follows the configured RPM and the latency seen. Reserving is twice in flight:
reservations use estimates (a reply's length is unknown until it comes), and a queue of thousands
reserving at once would pace them all by those first guesses, so only calls near the front reserve.
"""
from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math

from facets.schemas.config import RateLimits

ADAPTIVE_MIN = 8
ADAPTIVE_MAX = 512
ADAPTIVE_START = 64
HEADROOM = 1.5  # latency varies call to call; the rate bucket, not this bound, is what paces
LATENCY_WEIGHT = 0.05


class Slots:
    """A semaphore whose size can change; waiters are served by priority (higher first), then in arrival order."""

    def __init__(self, size: int):
        self.size = size
        self.used = 0
        self._waiters: list[tuple[int, int, asyncio.Future]] = []  # a heap of (-priority, arrival, future)
        self._arrivals = itertools.count()

    async def acquire(self, priority: int = 0) -> None:
        if self.used < self.size and not self._waiters:
            self.used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (-priority, next(self._arrivals), waiter)
        heapq.heappush(self._waiters, entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted just as it was cancelled: hand it on
                self.release()
            elif entry in self._waiters:  # else a release already passed over it
                self._waiters.remove(entry)
                heapq.heapify(self._waiters)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, size: int) -> None:
        self.size = size
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.size:
            waiter = heapq.heappop(self._waiters)[2]
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)

    async def __aenter__(self) -> "Slots":
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    @contextlib.asynccontextmanager
    async def slot(self, priority: int = 0):
        await self.acquire(priority)
        try:
            yield self
        finally:
            self.release()


class CallSlots:
    """In-flight and reserving slots of one endpoint, shared by the gateways of a run."""

    def __init__(self, limits: RateLimits):
        self.fixed = limits.max_in_flight is not None
        self.rate_per_s = limits.rpm / 60.0
        size = limits.max_in_flight or ADAPTIVE_START
        self.in_flight = Slots(size)
        self.reserving = Slots(2 * size)
        self.latency_s: float | None = None

    def observe(self, latency_s: float) -> None:
        """A reply's latency; with an adaptive bound, in flight becomes rate x latency (with headroom)."""
        self.latency_s = latency_s if self.latency_s is None else (
            self.latency_s + LATENCY_WEIGHT * (latency_s - self.latency_s))
        if self.fixed or not self.rate_per_s:
            return
        size = min(ADAPTIVE_MAX, max(ADAPTIVE_MIN, math.ceil(self.rate_per_s * self.latency_s * HEADROOM)))
        if size != self.in_flight.size:
            self.in_flight.resize(size)
            self.reserving.resize(2 * size)


def connection_limit(limits: RateLimits) -> int:
    """Connections a transport keeps open: one per call in flight at most."""
    return limits.max_in_flight or ADAPTIVE_MAX
