"""Stable identities: instruction ids, shard buckets and content fingerprints.

docs/ARCHITECTURE.md, decision 2: an instruction's id is a hash of its normalised text, and the rule's version is part
of the id. Changing the rule re-keys every row of every stage, so it is versioned, never edited.
"""
from __future__ import annotations

import hashlib
import unicodedata

import orjson

ID_RULE_VERSION = "n1"
# Decision 3: shards are a pure function of the id. Buckets are fixed; a shard is a set of buckets.
NUM_BUCKETS = 1024


def normalise_text(text: str) -> str:
    """Unicode NFC, stripped, runs of whitespace collapsed to one space, case kept."""
    # str.split() and the regex \s split on exactly the same characters; split/join is 3x faster
    return " ".join(unicodedata.normalize("NFC", text).split())


def instruction_id(text: str) -> str:
    digest = hashlib.sha256(normalise_text(text).encode("utf-8")).hexdigest()[:24]
    return f"{ID_RULE_VERSION}-{digest}"


def bucket_of(instruction_id: str) -> int:
    """The bucket an instruction belongs to; new instructions never move old ones."""
    digest = hashlib.blake2b(instruction_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % NUM_BUCKETS


def fingerprint(*parts: object) -> str:
    """Hash of a stage's inputs, prompt version, model and parameters (docs/ARCHITECTURE.md, principle 1)."""
    payload = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS, default=_jsonable)
    return hashlib.sha256(payload).hexdigest()[:32]


def _jsonable(value: object) -> object:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    raise TypeError(f"cannot fingerprint {type(value).__name__}")
