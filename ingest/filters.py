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
    return _role_play(text.lstrip())


def _role_play(stripped: str) -> str | None:
    # the first line alone, sliced rather than partitioned: partition would copy the rest of a long text
    end = stripped.find("\n")
    first_line = stripped if end < 0 else stripped[:end]
    lowered = first_line.lower()
    if "you" not in lowered and "imagine" not in lowered and "take" not in lowered:
        return None  # cheap pre-test: without one of these words ROLE_PLAY cannot match
    return "role_play" if ROLE_PLAY.search(first_line) else None


def drop_reason(text: str, user_turns: int = 1, language: str | None = None,
                max_chars: int = DEFAULT_MAX_CHARS) -> str | None:
    """The first rule an instruction breaks, or None when it is kept.

    The rules above, in this order, with the text stripped once: this runs for every source row.
    """
    if user_turns > 1:
        return "multi_turn"
    if language and not_english(language):
        return "not_english"
    stripped = text.strip()
    if not stripped:
        return "empty"
    if len(stripped) > max_chars:
        return "too_long"
    return _role_play(stripped)
