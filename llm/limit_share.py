"""One endpoint's limits shared by many worker processes: an even split that re-balances as they come and go.

Each process that paces calls to an (endpoint, model) registers itself in a Redis sorted set and beats
every second; members that missed three beats are dropped. With n live members each paces at 1/n of the
configured RPM and TPM. No round trip per call (DESIGN decision 14): one small request a second.
A process that joins starts from an empty bucket in debt for 1.5 beats (`Limiter.hold`), so that the
others have lowered their share before its first call, and a 60 s window never holds more than the limit.
"""
from __future__ import annotations

import atexit
import threading
import uuid

BEAT_S = 1.0
MISSED_BEATS = 3


class LimitShare:
    def __init__(self, url: str, key: str, on_share):
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=5)
        self.key = f"facets:limit:{key}"
        self.member = uuid.uuid4().hex
        self.on_share = on_share
        self.members = 1
        self._stop = threading.Event()
        self.beat()  # registered before the first call
        self._thread = threading.Thread(target=self._run, name="facets-limit-share", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def beat(self) -> int:
        seconds, micros = self.client.time()
        now = seconds + micros / 1e6
        pipe = self.client.pipeline()
        pipe.zadd(self.key, {self.member: now})
        pipe.zremrangebyscore(self.key, "-inf", now - MISSED_BEATS * BEAT_S)
        pipe.zcard(self.key)
        pipe.expire(self.key, int(10 * MISSED_BEATS * BEAT_S))
        self.members = max(1, int(pipe.execute()[2]))
        self.on_share(1.0 / self.members)
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
        except Exception:  # noqa: BLE001 - at exit; the member expires after its missed beats anyway
            pass
