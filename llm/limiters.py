"""The limiters of one run: one per (endpoint, model), shared by every gateway of the run.

A run (a build, a bench build, an evaluation) makes one `Limiters` and hands it to each of its gateways, so
the stages of a run share one pace per model, never a process-wide one: two runs in one process (tests, a
worker) do not see each other's limits. With `limits.share_via`, a limiter takes its budget in leases from
one bucket in Redis that every process calling the endpoint shares (llm/limit_share.py).
"""
from __future__ import annotations

import threading

from facets.llm.limit_share import LimitLease
from facets.llm.limiter import Limiter
from facets.schemas.config import RateLimits


class Limiters:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Limiter] = {}
        self._lock = threading.Lock()  # gateways of one run may live on several event loops

    def get(self, endpoint: str, model: str, limits: RateLimits) -> Limiter:
        with self._lock:
            limiter = self._by_key.get((endpoint, model))
            if limiter is None or limiter.limits != limits:
                if limiter is not None and limiter.lease is not None:
                    limiter.lease.close()
                limiter = self._by_key[(endpoint, model)] = Limiter(limits, leased=bool(limits.share_via))
                if limits.share_via:
                    limiter.lease = LimitLease(limits.share_via, f"{endpoint}|{model}", limiter)
            return limiter

    def close(self) -> None:
        """Gives back the budget the leases still hold, so other processes can use it."""
        with self._lock:
            for limiter in self._by_key.values():
                if limiter.lease is not None:
                    limiter.lease.close()
            self._by_key.clear()
