"""Prices per model and the cost of a call. An unknown model's cost is unknown (None), never zero."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens."""

    input: float
    cached_input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        fresh = max(0, prompt_tokens - cached_tokens)
        return (fresh * self.input + cached_tokens * self.cached_input + completion_tokens * self.output) / 1e6


# Published list prices (USD per 1M tokens); override or extend per run with EndpointConfig.prices.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4-0125-preview": Price(10.0, 10.0, 30.0),
    "gpt-4-turbo": Price(10.0, 10.0, 30.0),
    "gpt-4o": Price(2.5, 1.25, 10.0),
    "gpt-4o-mini": Price(0.15, 0.075, 0.6),
    "gpt-4.1": Price(2.0, 0.5, 8.0),
    "gpt-4.1-mini": Price(0.4, 0.1, 1.6),
    "gpt-4.1-nano": Price(0.1, 0.025, 0.4),
}
# Batch API calls cost half the online price.
BATCH_DISCOUNT = 0.5


class PriceTable:
    def __init__(self, overrides: dict[str, tuple[float, float, float]] | None = None):
        self.prices = dict(DEFAULT_PRICES)
        self.prices.update({model: Price(*p) for model, p in (overrides or {}).items()})

    def get(self, model: str) -> Price | None:
        if model in self.prices:
            return self.prices[model]
        # Dated snapshots ("gpt-4o-mini-2024-07-18") take their family's price.
        family = max((m for m in self.prices if model.startswith(m + "-")), key=len, default=None)
        return self.prices.get(family) if family else None
