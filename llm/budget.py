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

    def reserve(self, worst_case: float) -> float:
        """Hold `worst_case` dollars or refuse the call; concurrency can never overspend."""
        if self.max_cost is None:
            return 0.0
        with self._lock:
            if self.spent + self.reserved + worst_case > self.max_cost:
                raise BudgetExceeded(
                    f"max_cost ${self.max_cost:.2f} reached: ${self.spent:.4f} spent, ${self.reserved:.4f} held by "
                    f"calls in flight; the next call could cost up to ${worst_case:.4f}. Raise max_cost to go on; "
                    "finished calls are journaled and will not be paid again."
                )
            self.reserved += worst_case
            return worst_case

    def settle(self, held: float, actual: float) -> None:
        if self.max_cost is None:
            return
        with self._lock:
            self.reserved -= held
            self.spent += actual
