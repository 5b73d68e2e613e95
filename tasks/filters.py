"""The paper's instruction rules: each a small function that returns a drop reason or None.

Multifaceted Collection keeps single-turn English instructions, drops exact duplicates (done by the ingest
stage on instruction ids) and drops instructions that already carry a role-play preamble, so that the
generated system messages are not biased by one. The published regex is garbled; `ROLE_PLAY` is the
reconstruction of its intent: the first line contains, at word boundaries, "you are", "you're",
"imagine" or "take ... role", in any case. The paper names no length limit; `too_long` guards the
later stages' context windows and is a parameter.
"""
from __future__ import annotations

import re

DEFAULT_MAX_CHARS = 8000

# Curly apostrophes are common in scraped text and carry the same preamble.
ROLE_PLAY = re.compile(r"\b(?:you are|you['\u2019]re|imagine|take \w*(?: \w+)* role)\b", re.IGNORECASE)
# Cheap pre-test: a first line without any of these words cannot match ROLE_PLAY.
_ROLE_PLAY_WORDS = ("you", "imagine", "take")
_ENGLISH = {"english", "en"}


def multi_turn(user_turns: int) -> str | None:
    return "multi_turn" if user_turns > 1 else None


def not_english(language: str | None) -> str | None:
    """Only where a source records a language; "English" (Chatbot Arena) or an `en` code."""
    if not language:
        return None
    tag = language.strip().lower()
    if tag in _ENGLISH or tag.startswith(("en-", "en_")):
        return None
    return "not_english"


def empty(text: str) -> str | None:
    return None if text.strip() else "empty"


def too_long(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    return "too_long" if len(text.strip()) > max_chars else None


def role_play(text: str) -> str | None:
    first_line = text.strip().partition("\n")[0]
    lowered = first_line.lower()
    if not any(word in lowered for word in _ROLE_PLAY_WORDS):
        return None
    return "role_play" if ROLE_PLAY.search(first_line) else None


def drop_reason(text: str, user_turns: int = 1, language: str | None = None,
                max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """The first rule an instruction breaks, or None when it is kept."""
    return (
        multi_turn(user_turns)
        or not_english(language)
        or empty(text)
        or too_long(text, max_chars)
        or role_play(text)
    )
