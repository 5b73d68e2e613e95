"""Token estimates without a tokenizer download, corrected by the usage the endpoint reports."""
from __future__ import annotations

CHARS_PER_TOKEN = 4.0
TOKENS_PER_MESSAGE = 4


class TokenEstimator:
    """chars/4 per message, scaled by the observed ratio of reported to estimated prompt tokens."""

    def __init__(self, smoothing: float = 0.05):
        self.ratio = 1.0
        self.smoothing = smoothing

    @staticmethod
    def raw(messages: list[dict], extra_chars: int = 0) -> float:
        chars = sum(len(m.get("content") or "") for m in messages) + extra_chars
        return chars / CHARS_PER_TOKEN + TOKENS_PER_MESSAGE * len(messages)

    def estimate(self, messages: list[dict], extra_chars: int = 0) -> int:
        return max(1, round(self.raw(messages, extra_chars) * self.ratio))

    def observe(self, raw_estimate: float, reported: int) -> None:
        if raw_estimate > 0 and reported > 0:
            self.ratio += self.smoothing * (reported / raw_estimate - self.ratio)
