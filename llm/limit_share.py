"""One endpoint's limits shared by many worker processes: a split that re-balances as they come and go.

Each process that paces calls to an (endpoint, model) registers itself in a Redis sorted set and beats
every second; members that missed three beats are dropped. With each beat a member also says what it
wants: "all it can get" when calls wait in its limiter, else the request rate it reserved over the last
beat (with headroom to grow). The limit is then split by water-filling (`split`): members that want
less than an even part get what they want, the rest share what is left evenly; with nobody waiting,
each gets its rate and an even part of the rest. So a shard draining its last retries, or a run between
stages, does not hold a budget it cannot use. No round trip per call (DESIGN decision 14): two small
requests a second. A process that joins counts as wanting all it can get and starts from an empty
bucket in debt for 1.5 beats (`Limiter.hold`), so that the others have lowered their share before its
first call, and a 60 s window never holds more than the limit.
"""
from __future__ import annotations

import atexit
import math
import threading
import time
import uuid

BEAT_S = 1.0
MISSED_BEATS = 3
HEADROOM = 1.25  # a member that is not waiting may grow by this much before its next beat
MIN_SHARE = 0.02


def split(wants: dict[str, float]) -> dict[str, float]:
    """Shares (summing to 1) of members that want these fractions of the limit (inf: all they can get)."""
    shares: dict[str, float] = {}
    left, open_ = 1.0, sorted(wants, key=lambda m: wants[m])
    while open_ and wants[open_[0]] * len(open_) <= left:  # wants no more than an even part of what is left
        member = open_.pop(0)
        shares[member] = max(MIN_SHARE, wants[member])
        left -= shares[member]
    for member in open_:
        shares[member] = max(MIN_SHARE, left / len(open_))
    if not open_ and left > 0:  # everybody satisfied: the rest is spread evenly, room to grow
        for member in shares:
            shares[member] += left / len(shares)
    total = sum(shares.values())
    return {member: share / total for member, share in shares.items()}


class LimitShare:
    def __init__(self, url: str, key: str, on_share, waiting=None, reserved=None, full_rate: float = 0.0):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.key = f"facets:limit:{key}"
        self.wants_key = f"{self.key}:wants"
        self.member = uuid.uuid4().hex
        self.on_share = on_share
        # this process's limiter: calls waiting, requests reserved so far, and the unshared request rate;
        # without them a member always wants all it can get (an even split)
        self.waiting, self.reserved, self.full_rate = waiting, reserved, full_rate
        self.members = 1
        self.share = 1.0
        self._last: tuple[float, float] | None = None
        self._stop = threading.Event()
        self.beat()  # registered before the first call
        self._thread = threading.Thread(target=self._run, name="facets-limit-share", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def wants(self) -> float:
        """The fraction of the limit this process wants now (inf: all it can get)."""
        now = time.monotonic()
        count = self.reserved() if self.reserved else 0.0
        last, self._last = self._last, (now, count)
        if last is None or self.waiting is None or not self.full_rate or self.waiting():
            return math.inf
        rate = (count - last[1]) / max(now - last[0], 1e-3)
        return HEADROOM * rate / self.full_rate

    def beat(self) -> int:
        seconds, micros = self.client.time()
        now = seconds + micros / 1e6
        ttl = int(10 * MISSED_BEATS * BEAT_S)
        pipe = self.client.pipeline()
        pipe.zadd(self.key, {self.member: now})
        pipe.hset(self.wants_key, self.member, repr(self.wants()))
        pipe.zremrangebyscore(self.key, "-inf", now - MISSED_BEATS * BEAT_S)
        pipe.zrange(self.key, 0, -1)
        pipe.expire(self.key, ttl)
        pipe.expire(self.wants_key, ttl)
        members = [m.decode() for m in pipe.execute()[3]] or [self.member]
        values = self.client.hmget(self.wants_key, members)
        wants = {m: float(v) if v is not None else math.inf for m, v in zip(members, values)}
        self.members = len(members)
        self.share = split(wants).get(self.member, 1.0 / self.members)
        self.on_share(self.share)
        return self.members

    def _run(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - Redis away: keep the last share, try again next beat
                continue

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.client.zrem(self.key, self.member)
            self.client.hdel(self.wants_key, self.member)
        except Exception:  # noqa: BLE001 - at exit; the member expires after its missed beats anyway
            pass
