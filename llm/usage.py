"""Running totals of a gateway: requests, tokens, cost, 429s, retries, failures and latency."""
from __future__ import annotations

import random
import threading
from collections import Counter
from dataclasses import dataclass, field

RESERVOIR = 10_000


@dataclass
class Usage:
    requests: int = 0
    ok: int = 0
    journal_hits: int = 0
    rate_limited: int = 0
    retries: int = 0
    errors: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost: float = 0.0
    cost_known: bool = True
    latencies: list[float] = field(default_factory=list)
    _seen_latencies: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_reply(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, cost: float | None, latency_s: float) -> None:
        with self._lock:
            self.ok += 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.cached_tokens += cached_tokens
            if cost is None:
                self.cost_known = False
            else:
                self.cost += cost
            self._sample_latency(latency_s)

    def _sample_latency(self, latency_s: float) -> None:
        # A bounded reservoir keeps memory flat over hundreds of thousands of calls.
        self._seen_latencies += 1
        if len(self.latencies) < RESERVOIR:
            self.latencies.append(latency_s)
        else:
            slot = random.randrange(self._seen_latencies)
            if slot < RESERVOIR:
                self.latencies[slot] = latency_s

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, object]:
        """JSON-able totals; cost is None when any call's model had no known price."""
        return {
            "requests": self.requests,
            "ok": self.ok,
            "journal_hits": self.journal_hits,
            "rate_limited": self.rate_limited,
            "retries": self.retries,
            "errors": dict(self.errors),
            "failures": dict(self.failures),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "cost_usd": round(self.cost, 6) if self.cost_known else None,
            "latency_p50_s": self.percentile(0.5),
            "latency_p95_s": self.percentile(0.95),
        }


def merge_usage(parts: list[dict[str, dict[str, object]]]) -> dict[str, dict[str, object]]:
    """Per-stage summaries of several processes added up (latency percentiles do not add: they are dropped)."""
    merged: dict[str, dict[str, object]] = {}
    for part in parts:
        for stage, summary in part.items():
            total = merged.setdefault(stage, {"cost_usd": 0.0})
            for name, value in summary.items():
                if name.startswith("latency_"):
                    continue
                if name == "cost_usd":
                    total[name] = None if value is None or total[name] is None else round(total[name] + value, 6)
                elif isinstance(value, dict):
                    counts = Counter(total.get(name) or {})
                    counts.update(value)
                    total[name] = dict(counts)
                else:
                    total[name] = total.get(name, 0) + value
    return merged
