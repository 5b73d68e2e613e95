"""Plausible English text and schema-valid JSON instances for the simulator.

Everything here is a pure function of a `random.Random`, so a reply is deterministic per request.
The text only has to read like a model's output to a validator (second person, given phrases woven
in, sensible lengths); nothing here is meant to be good writing.
"""
from __future__ import annotations

import math
import random
import re
import string
import uuid
from functools import lru_cache
from typing import Any, Callable

# Tokens are ASCII punctuation marks (each its own token) and the runs of other non-space
# characters between them: about 1.3 per English word, counted with C-speed str methods.
_PUNCT = string.punctuation.replace("_", "")
TOKEN_RE = re.compile(f"[{re.escape(_PUNCT)}]|[^\\s{re.escape(_PUNCT)}]+")
_DROP_PUNCT = str.maketrans("", "", _PUNCT)
_SPACE_PUNCT = str.maketrans(_PUNCT, " " * len(_PUNCT))
POOL_SIZE = 512
QUOTED_RE = re.compile(r'"([^"\n]{2,400})"|\u201c([^\u201d\n]{2,400})\u201d')
MAX_PHRASES = 24
# A $ref chain this deep is a schema no model could answer either.
MAX_DEPTH = 64


def count_tokens(text: str) -> int:
    """The simulator's tokenizer: len(TOKEN_RE.findall(text)), only faster."""
    return len(text) - len(text.translate(_DROP_PUNCT)) + len(text.translate(_SPACE_PUNCT).split())


def cut_tokens(text: str, limit: int) -> str:
    """`text` up to the end of its `limit`-th token."""
    if limit <= 0:
        return ""
    for index, match in enumerate(TOKEN_RE.finditer(text), 1):
        if index == limit:
            return text[: match.end()]
    return text


def cut_half(text: str) -> str:
    """The first half of `text`, ended at a word boundary when there is one."""
    half = len(text) // 2
    space = text.rfind(" ", 0, half)
    return text[:space] if space > 0 else text[:half]


def quoted_phrases(text: str) -> list[str]:
    """Phrases quoted with straight or curly double quotes, in order, without duplicates."""
    found = (a or b for a, b in QUOTED_RE.findall(text))
    return list(dict.fromkeys(p.strip() for p in found if p.strip()))[:MAX_PHRASES]


# --- vocabulary -----------------------------------------------------------------------------

_VERBS = ("favor", "offer", "build", "share", "craft", "present", "choose", "organize", "deliver",
          "highlight", "provide", "shape", "prefer", "suggest", "develop")
BANKS: dict[str, tuple[str, ...]] = {
    "adj": ("clear", "concise", "practical", "vivid", "thoughtful", "balanced", "engaging",
            "structured", "careful", "patient", "rigorous", "friendly", "precise", "detailed",
            "approachable", "insightful", "creative", "grounded", "respectful", "nuanced", "direct",
            "reliable", "gentle", "well-sourced", "step-by-step", "focused"),
    "noun": ("explanations", "examples", "answers", "insights", "details", "steps", "analogies",
             "summaries", "comparisons", "arguments", "suggestions", "perspectives", "ideas",
             "solutions", "stories", "guidelines", "facts", "references", "outlines", "checklists"),
    "abstract": ("clarity", "depth", "accuracy", "context", "structure", "curiosity", "efficiency",
                 "safety", "nuance", "relevance", "creativity", "precision", "empathy", "simplicity",
                 "honesty", "balance", "rigor", "warmth"),
    "verb": _VERBS,
    "verbs": tuple(v + "s" for v in _VERBS),
    "audience": ("the user", "a curious reader", "a busy professional", "a newcomer to the topic",
                 "an expert audience", "a student", "someone short on time", "a hobbyist"),
    "goal": ("understand the core idea", "act on the advice right away", "see how the pieces fit",
             "weigh the trade-offs", "trust the answer", "remember the key points",
             "explore the topic further", "avoid common mistakes"),
    "topic": ("preference", "approach", "response style", "guideline", "choice"),
}

# Second person; the first sentence of a reply always comes from YOU.
YOU = (
    "You {verb} {adj} {noun} that help {audience} {goal}.",
    "You {verb} {adj} {noun} and {adj} {noun} whenever {audience} asks for help.",
    "You keep your tone {adj} and your sense of {abstract} steady, so that {audience} can {goal}.",
    "You value {abstract} and {abstract}, and you {verb} {adj} {noun} to show it.",
    "You avoid vague {noun} and instead {verb} {adj} {noun} grounded in {abstract}.",
    "You treat every question as a chance to {verb} {adj} {noun}.",
)
YOU_OR_YOUR = YOU + (
    "When {audience} needs to {goal}, you {verb} {adj} {noun}.",
    "Your answers stay {adj} and {adj}, with {adj} {noun} where they matter most.",
    "Your feel for {abstract} guides how you {verb} {noun} for {audience}.",
)
WEAVE = (
    "You hold to one guiding principle here: {phrase}",
    "You keep this firmly in mind: {phrase}",
    "You let this shape every answer: {phrase}",
    "Above all, you honor this: {phrase}",
)
# Third person, for text fields of structured replies.
ABOUT = (
    "This {topic} {verbs} {adj} {noun} that help {audience} {goal}.",
    "It calls for {adj} {noun} and a {adj} tone throughout.",
    "The emphasis is on {abstract} and {abstract}, with {adj} {noun} where needed.",
    "{Adj} {noun} make the answer easier for {audience} to follow.",
    "It {verbs} {adj} {noun} over {adj} {noun}.",
)
CLAUSES = (
    "{Adj} {noun} that help {audience} {goal}",
    "Prefers {adj} {noun} with a focus on {abstract}",
    "{Abstract} and {abstract} in every answer",
    "An approach that {verbs} {adj} {noun}",
)
SHORT = ("{Abstract}", "{Adj} {noun}", "{Adj} {abstract}")
# Plausible but wrong: third person, a list, no woven phrases.
LIST_LINES = (
    "- The assistant {verbs} {adj} {noun}.",
    "- The response covers {abstract} and {abstract}.",
    "- It includes {adj} {noun} for {audience}.",
    "- The answer mentions {noun} and {noun} briefly.",
)


class _Slots(dict):
    """format_map source: each {slot} draws a fresh word; {Slot} capitalises it."""

    def __init__(self, rng: random.Random, **fixed: str) -> None:
        super().__init__(fixed)
        self.rng = rng

    def __missing__(self, key: str) -> str:
        word = self.rng.choice(BANKS[key.lower()])
        return word[0].upper() + word[1:] if key[0].isupper() else word


def fill(rng: random.Random, templates: tuple[str, ...], **fixed: str) -> str:
    return rng.choice(templates).format_map(_Slots(rng, **fixed))


@lru_cache(maxsize=None)
def _pool(templates: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Pre-filled (sentence, tokens) for a template family: a reply picks whole sentences, which
    keeps the per-request cost to one random draw per sentence."""
    rng = random.Random(templates[0])
    return tuple((text, count_tokens(text)) for text in (fill(rng, templates) for _ in range(POOL_SIZE)))


def pick(rng: random.Random, templates: tuple[str, ...]) -> tuple[str, int]:
    pool = _pool(templates)
    return pool[int(rng.random() * len(pool))]


def randint(rng: random.Random, low: int, high: int) -> int:
    """random.randint for small ranges, several times cheaper."""
    return low + int(rng.random() * (high - low + 1))


def sentences(rng: random.Random, low: int, high: int) -> str:
    return " ".join(pick(rng, ABOUT)[0] for _ in range(randint(rng, low, high)))


# --- prose ----------------------------------------------------------------------------------

def reply_length(rng: random.Random, mean_tokens: int) -> int:
    """Tokens for one reply: lognormal with the given mean."""
    sigma = 0.35
    return max(8, round(rng.lognormvariate(math.log(mean_tokens) - sigma * sigma / 2, sigma)))


def prose(rng: random.Random, target_tokens: int, phrases: list[str], one_paragraph: bool = False) -> str:
    """Second-person paragraphs of about `target_tokens` that contain every phrase verbatim."""
    woven = [fill(rng, WEAVE, phrase=_as_sentence(p)) for p in phrases]
    budget = target_tokens - sum(count_tokens(s) for s in woven)
    first, used = pick(rng, YOU)
    fillers = [first]
    while used < budget:
        text, tokens = pick(rng, YOU_OR_YOUR)
        fillers.append(text)
        used += tokens
    parts = _interleave(fillers, woven)
    return " ".join(parts) if one_paragraph else _paragraphs(rng, parts)


def off_spec_prose(rng: random.Random, target_tokens: int) -> str:
    """A third-person bulleted list: what a careless model returns instead of the asked-for prose."""
    lines = ["Key points:"]
    used = 2
    while used < target_tokens:
        text, tokens = pick(rng, LIST_LINES)
        lines.append(text)
        used += tokens
    return "\n".join(lines)


def _as_sentence(phrase: str) -> str:
    return phrase if phrase[-1] in ".!?" else phrase + "."


def _interleave(fillers: list[str], woven: list[str]) -> list[str]:
    out = fillers[:1]
    rest = fillers[1:]
    for i in range(max(len(rest), len(woven))):
        out.extend(part[i] for part in (woven, rest) if i < len(part))
    return out


def _paragraphs(rng: random.Random, parts: list[str]) -> str:
    paragraphs = []
    while parts:
        size = randint(rng, 4, 6)
        paragraphs.append(" ".join(parts[:size]))
        parts = parts[size:]
    return "\n\n".join(paragraphs)


# --- structured replies ---------------------------------------------------------------------

LONG_FIELDS = frozenset({
    "description", "explanation", "rationale", "reason", "reasoning", "justification", "feedback",
    "summary", "comment", "analysis", "answer", "response", "output", "content", "text", "message",
    "body", "system", "details", "critique", "evaluation", "note", "instruction", "prompt",
    "overview", "context",
})
SHORT_FIELDS = frozenset({
    "name", "title", "label", "category", "dimension", "subdimension", "keyword", "tag", "topic",
    "type", "kind", "source", "role", "id", "domain", "language", "tone", "style", "level",
    "status", "aspect", "area", "heading",
})
FORMATS: dict[str, Callable[[random.Random], str]] = {
    "date-time": lambda rng: f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T12:00:00Z",
    "date": lambda rng: f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    "time": lambda rng: f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00",
    "email": lambda rng: f"user{rng.randint(1, 999)}@example.com",
    "uri": lambda rng: f"https://example.com/item/{rng.randint(1, 999)}",
    "uuid": lambda rng: str(uuid.UUID(int=rng.getrandbits(128), version=4)),
}
FORMATS["url"] = FORMATS["uri"]


def singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


@lru_cache(maxsize=4096)
def field_kind(name: str) -> str:
    """"long" (1-3 sentences), "short" (a few words) or "medium" (a clause), from a field's name."""
    words = [singular(w) for w in re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower())]
    if any(w in LONG_FIELDS for w in words):
        return "long"
    if words and words[-1] in SHORT_FIELDS:
        return "short"
    return "medium"


def field_text(rng: random.Random, name: str) -> str:
    kind = field_kind(name)
    if kind == "long":
        return sentences(rng, 1, 3)
    return pick(rng, SHORT if kind == "short" else CLAUSES)[0]


def schema_instance(schema: dict, rng: random.Random, *, dull: bool = False) -> Any:
    """A JSON value valid against `schema`; `dull` makes every string empty or the same filler and
    repeats array items (schema-valid, yet a reply a careful validator rejects)."""
    return _Maker(schema, rng, dull).value(schema, "", False, None, 0)


def break_instance(instance: Any, schema: dict, rng: random.Random) -> Any:
    """Parseable JSON that violates `schema`: a required key dropped and a value of the wrong type."""
    top = _Maker(schema, rng, False).resolved(schema)
    if not isinstance(instance, dict) or not instance:
        return [instance] if isinstance(instance, dict) else {"value": instance}
    required = [key for key in top.get("required", ()) if key in instance]
    if required:
        del instance[rng.choice(required)]
    if instance:  # also a wrong type, in case the reader defaults the missing key
        key = rng.choice(sorted(instance))
        instance[key] = _wrong_type(instance[key])
    return instance


def _wrong_type(value: Any) -> Any:
    if isinstance(value, str):
        return 42
    if isinstance(value, (bool, int, float)):
        return "forty-two"
    return None if value is not None else 0


class _Maker:
    """One instance's walk over a schema. `lean` is set below a recursive $ref: arrays shrink to
    minItems and optional parts are left out, so recursive schemas terminate. `slot` is the
    position in the nearest array, used to rotate enum values so sibling items differ."""

    def __init__(self, root: dict, rng: random.Random, dull: bool) -> None:
        self.root, self.rng, self.dull = root, rng, dull
        self.expanding: list[str] = []
        self.kinds = {"object": self.object, "array": self.array, "string": self.string,
                      "integer": self.integer, "number": self.number,
                      "boolean": self.boolean, "null": self.null}

    def value(self, schema: Any, name: str, lean: bool, slot: int | None, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError("the response schema nests too deeply to instantiate")
        if not isinstance(schema, dict) or not schema:
            return self.string({}, name, lean, slot, depth)
        if "$ref" in schema:
            return self.follow(schema["$ref"], name, lean, slot, depth)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.choose(schema["enum"], slot)
        branches = schema.get("anyOf") or schema.get("oneOf")
        if branches:
            return self.value(self.branch(branches, lean), name, lean, slot, depth + 1)
        if "allOf" in schema:
            return self.value(self.merge(schema), name, lean, slot, depth + 1)
        return self.kinds[_schema_type(schema)](schema, name, lean, slot, depth)

    def follow(self, ref: str, name: str, lean: bool, slot: int | None, depth: int) -> Any:
        recursive = ref in self.expanding
        self.expanding.append(ref)
        try:
            return self.value(self.resolve(ref), name, lean or recursive, slot, depth + 1)
        finally:
            self.expanding.pop()

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, got {ref!r}")
        node: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def resolved(self, schema: dict) -> dict:
        while isinstance(schema, dict) and "$ref" in schema:
            schema = self.resolve(schema["$ref"])
        return schema

    def merge(self, schema: dict) -> dict:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            for key, sub in self.resolved(part).items():
                if key == "properties":
                    merged["properties"] = {**merged.get("properties", {}), **sub}
                elif key == "required":
                    merged["required"] = [*merged.get("required", ()), *sub]
                else:
                    merged.setdefault(key, sub)
        return merged

    def choose(self, values: list, slot: int | None) -> Any:
        if self.dull:
            return values[0]
        return values[int(self.rng.random() * len(values)) if slot is None else slot % len(values)]

    def branch(self, branches: list, lean: bool) -> Any:
        if lean:
            simple = [b for b in branches if b.get("type") == "null"] or [b for b in branches if "$ref" not in b]
            return (simple or branches)[0]
        real = [b for b in branches if b.get("type") != "null"] or branches
        return real[0] if self.dull else real[int(self.rng.random() * len(real))]

    def object(self, schema: dict, name: str, lean: bool, slot: int | None, depth: int) -> dict:
        required = schema.get("required", ())
        out = {key: self.value(sub, key, lean, slot, depth + 1)
               for key, sub in schema.get("properties", {}).items() if not lean or key in required}
        extra = schema.get("additionalProperties")
        if not out and isinstance(extra, dict):
            count = max(schema.get("minProperties", 0), 0 if lean else 2)
            stem = singular(name) or "key"
            for i in range(count):
                out[f"{stem}_{i + 1}"] = self.value(extra, name, lean, None, depth + 1)
        return out

    def array(self, schema: dict, name: str, lean: bool, slot: int | None, depth: int) -> list:
        prefix = schema.get("prefixItems", ())
        items = schema.get("items", {})
        count = self.array_length(schema.get("minItems", 0), schema.get("maxItems"), lean)
        if items is False:
            count = min(count, len(prefix))
        item_name = singular(name)
        if self.dull and count and not prefix:
            return [self.value(items, item_name, lean, 0, depth + 1)] * count
        offset = int(self.rng.random() * 997)
        return [self.value(prefix[i] if i < len(prefix) else items, item_name, lean, offset + i, depth + 1)
                for i in range(count)]

    def array_length(self, low: int, high: int | None, lean: bool) -> int:
        if lean:
            return low
        if self.dull:
            return max(low, min(2, 2 if high is None else high))
        low_used = low if low or high == 0 else 1
        high_used = low_used + 2 if high is None else min(high, low_used + 2)
        return randint(self.rng, low_used, max(low_used, high_used))

    def string(self, schema: dict, name: str, lean: bool, slot: int | None, depth: int) -> str:
        fmt = FORMATS.get(schema.get("format", ""))
        if fmt is not None:
            return fmt(self.rng)
        text = "" if self.dull else field_text(self.rng, name)
        pad = (lambda: "n/a") if self.dull else (lambda: pick(self.rng, SHORT)[0].lower())
        return _fit(text, schema.get("minLength", 0), schema.get("maxLength"), pad)

    def integer(self, schema: dict, name: str, lean: bool, slot: int | None, depth: int) -> int:
        low, high = _bounds(schema)
        low = math.ceil(low) if low is not None else (min(1, math.floor(high)) if high is not None else 1)
        high = math.floor(high) if high is not None else low + 9
        if "exclusiveMinimum" in schema and low <= schema["exclusiveMinimum"]:
            low += 1
        if "exclusiveMaximum" in schema and high >= schema["exclusiveMaximum"]:
            high -= 1
        return low if self.dull else self.rng.randint(low, max(low, high))

    def number(self, schema: dict, name: str, lean: bool, slot: int | None, depth: int) -> float:
        low, high = _bounds(schema)
        low = low if low is not None else (0.0 if high is None or high > 0 else high - 10)
        high = high if high is not None else low + 10
        value = round(self.rng.uniform(low, high), 2)
        inside = low <= value <= high and value != schema.get("exclusiveMinimum") \
            and value != schema.get("exclusiveMaximum")
        return value if inside else (low + high) / 2

    def boolean(self, schema: dict, name: str, lean: bool, slot: int | None, depth: int) -> bool:
        return False if self.dull else self.rng.random() < 0.5

    def null(self, schema: dict, name: str, lean: bool, slot: int | None, depth: int) -> None:
        return None


def _schema_type(schema: dict) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        real = [k for k in kind if k != "null"]
        return real[0] if real else "null"
    if kind is not None:
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    return "array" if "items" in schema or "prefixItems" in schema else "string"


def _bounds(schema: dict) -> tuple[float | None, float | None]:
    """Inclusive-or-exclusive numeric bounds (exclusivity is applied by the caller)."""
    lows = [v for k in ("minimum", "exclusiveMinimum") if _is_number(v := schema.get(k))]
    highs = [v for k in ("maximum", "exclusiveMaximum") if _is_number(v := schema.get(k))]
    return (max(lows) if lows else None), (min(highs) if highs else None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fit(text: str, low: int, high: int | None, pad: Callable[[], str]) -> str:
    """`text` padded with more words to `low` characters and cut at a word boundary to `high`."""
    while len(text) < low:
        text = f"{text} {pad()}" if text else pad()
    if high is not None and len(text) > high:
        cut = text.rfind(" ", low, high + 1)
        text = text[:cut] if cut > 0 else text[:high]
    return text
