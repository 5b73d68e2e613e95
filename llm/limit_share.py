"""One endpoint's limits shared by many worker processes: one token bucket in Redis, taken in leases.

Redis holds the endpoint's buckets (requests, tokens, input and output tokens), refilled at the
configured rates up to SHARED_BURST of `burst_s` of them (the endpoint's own hold all of it). No process
pays a round trip per call (docs/ARCHITECTURE.md, decision 14): its limiter queues calls against local buckets that go
into debt (llm/limiter.py), and a thread of the process pays that debt from Redis every LEASE_S, in one atomic
script for all the buckets, at most LEASE_MAX_S of the whole rate at a time, and nothing while it holds
its part of UNSENT_ALL_S paid for and not sent (its calls wait for another bucket or a busy event loop:
taken then, the budget would go out later all at once, past the endpoint's burst). Each take tells how
many processes take lately, so what all of them hold unsent stays near UNSENT_ALL_S however many there
are (a process's first take, before it knows, may hold UNSENT_MAX_S). A process with nothing queued asks
for nothing and holds nothing; what it was given back (a reply shorter than reserved) beyond LEASE_S of
the rate goes back to Redis. So the busy processes have the whole limit between them the
moment they need it, whichever and however many they are, and no more leaves Redis in any span than the
rate allows plus one burst; a process whose replies say the endpoint is nearly empty holds its
sends until it has refilled (`Limiter._brake`). Redis away: a process goes on at the pace it was last
paid, and asks again.
"""
from __future__ import annotations

import atexit
import os
import random
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from facets.llm.limiter import SHARED_BURST

if TYPE_CHECKING:
    from facets.llm.limiter import Limiter

LEASE_S = 0.1
LEASE_MAX_S = 0.25  # the most one lease takes, in seconds of the whole rate: a newcomer cannot empty a full bucket
UNSENT_MAX_S = 0.15  # the most a process holds paid for and not sent, in seconds of the whole rate
# ... and all processes together: with what Redis banks (SHARED_BURST of a 1 s burst) it leaves 0.2 s of
# the endpoint's bucket for sends that bunch on the way (a loaded machine runs ten shard runs on two cores).
UNSENT_ALL_S = 0.3
TAKER_WINDOW_S = 2.0  # a process that took within this long counts as taking
KEY_TTL_S = 300  # an idle limit's buckets expire; the next taker finds them full, as they would be by then

# KEYS[1]: the limit's hash, KEYS[2]: its takers (a sorted set by last take); ARGV[1]: the taker, then per
# bucket its name, rate per second, capacity and amount (> 0: take up to it; < 0: give it back). Returns
# what each bucket gave, as strings (Redis would cut numbers to integers), then how many take.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - %f)
local given = {}
for i = 2, #ARGV, 4 do
  local name, rate, cap, amount = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local state = redis.call('HMGET', KEYS[1], name .. ':level', name .. ':stamp')
  local level = tonumber(state[1]) or cap
  local stamp = tonumber(state[2]) or now
  level = math.min(cap, level + math.max(0, now - stamp) * rate)
  local gave = 0
  if amount > 0 then
    gave = math.min(amount, math.max(level, 0))
    level = level - gave
  else
    level = math.min(cap, level - amount)
  end
  redis.call('HSET', KEYS[1], name .. ':level', tostring(level), name .. ':stamp', tostring(now))
  given[#given + 1] = tostring(gave)
end
redis.call('EXPIRE', KEYS[1], %d)
redis.call('EXPIRE', KEYS[2], %d)
given[#given + 1] = tostring(redis.call('ZCARD', KEYS[2]))
return given
""" % (TAKER_WINDOW_S, KEY_TTL_S, KEY_TTL_S)


class LimitLease:
    """This process's part of a limit kept in Redis: a thread that pays its limiter's debts from there."""

    def __init__(self, url: str, key: str, limiter: Limiter):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.key = f"facets:limit:{key}"
        self.takers_key = f"{self.key}:takers"
        self.taker = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.takers = 1  # processes taking from this limit lately, this one included
        self.limiter = limiter
        self.take = self.client.register_script(TAKE)
        self.trips = 0  # round trips to Redis (the cost of sharing: at most 1 / LEASE_S a second)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="facets-limit-lease", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    @property
    def unsent_s(self) -> float:
        """The most this process holds paid for and not sent: its part of UNSENT_ALL_S."""
        return min(UNSENT_MAX_S, UNSENT_ALL_S / self.takers)

    def lease(self, seconds: float) -> dict[str, float]:
        """One lease: what the limiter owes is taken from Redis (and what it holds beyond LEASE_S given back)."""
        owed = self.limiter.owed(LEASE_S, self.unsent_s)
        buckets = self.limiter.buckets()
        asks = {name: min(amount, buckets[name].full_rate * LEASE_MAX_S) for name, amount in owed.items() if amount}
        if not asks:
            return {}
        args: list[str] = [self.taker]
        for name, amount in asks.items():
            bucket = buckets[name]
            args += [name, repr(bucket.full_rate), repr(bucket.full_rate * bucket.burst_s * SHARED_BURST), repr(amount)]
        taking = {name: amount for name, amount in asks.items() if amount > 0}
        try:
            *gave, takers = (float(g) for g in self.take(keys=[self.key, self.takers_key], args=args))
            given, self.takers = dict(zip(asks, gave)), max(1, int(takers))
            self.trips += 1
        except Exception:  # noqa: BLE001 - Redis away: go on at the pace last paid, ask again next lease
            given = {name: min(amount, buckets[name].rate * seconds) for name, amount in taking.items()}
            asks = taking  # nothing was given back
        # what was given back leaves this process's buckets; what was taken is paid into them
        self.limiter.credit({name: given.get(name, 0.0) if amount > 0 else amount for name, amount in asks.items()},
                            seconds, taking)
        return given

    def _run(self) -> None:
        last = time.monotonic()
        # the leases of many processes fall at different moments, so each takes what refilled since the last
        while not self._stop.wait(LEASE_S * random.uniform(0.8, 1.2)):
            now = time.monotonic()
            self.lease(now - last)
            last = now

    def close(self) -> None:
        """Stop leasing (what the process holds, at most LEASE_S of the rate, refills Redis's bucket anyway)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=2 * LEASE_S + 5)
