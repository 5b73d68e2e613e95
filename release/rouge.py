"""ROUGE-L between two texts: the F-measure of the longest common subsequence of their tokens.

Tokens are lower-cased runs of letters and digits, as ROUGE's default tokenizer makes them (no stemming).
The LCS length is computed bit-parallel (Hyyro 2004): one big-integer step per token of the first text, so
two 250-token system messages take well under a millisecond in pure Python.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for position, token in enumerate(b):
        masks[token] = masks.get(token, 0) | (1 << position)
    full = (1 << len(b)) - 1
    row = full
    for token in a:
        match = row & masks.get(token, 0)
        row = ((row + match) | (row - match)) & full
    return len(b) - bin(row).count("1")


def rouge_l(a: str | list[str], b: str | list[str]) -> float:
    """ROUGE-L F1 of two texts (or token lists); 0.0 when either is empty."""
    x = tokens(a) if isinstance(a, str) else a
    y = tokens(b) if isinstance(b, str) else b
    common = lcs_length(x, y)
    if not common:
        return 0.0
    precision, recall = common / len(x), common / len(y)
    return 2 * precision * recall / (precision + recall)
