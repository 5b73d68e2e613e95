"""A hard spend cap: every call reserves its worst case before it is sent (decision 7)."""
from __future__ import annotations

import threading

from facets.llm.errors import BudgetExceeded


class Budget:
    def __init__(self, max_cost: float | None):
        self.max_cost = max_cost
        self.spent = 0.0
        self.reserved = 0.0
        self._lock = threading.Lock()

    def reserve(self, worst_case: float) -> float | None:
        """Hold `worst_case` dollars, so concurrency can never overspend. None while calls in flight hold
        what this one needs: they will give back what they do not spend, so wait for them rather than
        stop the run (64 worst cases in flight can exceed a cap that has most of its money left).
        BudgetExceeded once even a settled run could not afford the call."""
        if self.max_cost is None:
            return 0.0
        with self._lock:
            if self.spent + self.reserved + worst_case <= self.max_cost:
                self.reserved += worst_case
                return worst_case
            if self.reserved > 0 and self.spent + worst_case <= self.max_cost:
                return None
            raise BudgetExceeded(
                f"max_cost ${self.max_cost:.2f} reached: ${self.spent:.4f} spent, ${self.reserved:.4f} held by "
                f"calls in flight; the next call could cost up to ${worst_case:.4f}. Raise max_cost to go on; "
                "finished calls are journaled and will not be paid again."
            )

    def settle(self, held: float, actual: float) -> None:
        if self.max_cost is None:
            return
        with self._lock:
            self.reserved -= held
            self.spent += actual
