"""The context windows of common models, and the check that a call fits its model's before it is sent.

An endpoint refuses (or, some servers, silently truncates) a request whose prompt plus `max_tokens`
exceeds the model's window; an oversized instruction should cost nothing and fail as that row's
failure, not reach the endpoint. The window comes from `EndpointConfig.context_window` when set, else
from the table below, matched by the longest prefix of the model id; an unknown model is not checked.
"""
from __future__ import annotations

from functools import lru_cache

from facets.llm.tokens import TokenEstimator

# Prefix of a model id (lower case, without an `org/` part) -> its context window in tokens, input and
# output together. A prefix matches the whole id or the id up to a `-`, `:` or `@` (a date, a size, a
# quantisation), so `gpt-4` covers `gpt-4-0613` but not `gpt-4o` or a future `gpt-4.7`.
CONTEXT_WINDOWS: dict[str, int] = {
    # OpenAI
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "chatgpt-4o-latest": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4-0125-preview": 128_000,
    "gpt-4-1106-preview": 128_000,
    "gpt-4-vision-preview": 128_000,
    "gpt-4": 8_192,
    "gpt-4-32k": 32_768,
    "gpt-4.1": 1_047_576,
    "gpt-4.5-preview": 128_000,
    "gpt-5": 400_000,
    "gpt-3.5-turbo": 16_385,
    "gpt-3.5-turbo-0613": 4_096,
    "gpt-3.5-turbo-0301": 4_096,
    "gpt-3.5-turbo-instruct": 4_096,
    "o1": 200_000,
    "o1-mini": 128_000,
    "o1-preview": 128_000,
    "o3": 200_000,
    "o3-mini": 200_000,
    "o4-mini": 200_000,
    # Mistral (open weights as on the hub, and the hosted names)
    "mistral-7b-instruct-v0.1": 8_192,
    "mistral-7b-instruct-v0.2": 32_768,
    "mistral-7b-instruct-v0.3": 32_768,
    "mistral-7b-v0.1": 8_192,
    "mistral-7b-v0.3": 32_768,
    "open-mistral-7b": 32_768,
    "mixtral-8x7b": 32_768,
    "open-mixtral-8x7b": 32_768,
    "mixtral-8x22b": 65_536,
    "open-mixtral-8x22b": 65_536,
    "mistral-nemo": 128_000,
    "open-mistral-nemo": 128_000,
    "mistral-large": 128_000,
    "mistral-large-2402": 32_768,
    # Llama
    "llama-2": 4_096,
    "meta-llama-3": 8_192,
    "llama-3": 8_192,
    "meta-llama-3.1": 131_072,
    "llama-3.1": 131_072,
    "llama-3.2": 131_072,
    "llama-3.3": 131_072,
    # others whose id says the family
    "gemma-2": 8_192,
    "qwen2.5": 32_768,
    "claude-3": 200_000,
}
SEPARATORS = ("-", ":", "@")


@lru_cache(maxsize=256)
def known_window(model: str) -> int | None:
    """The table's window for `model` (longest matching prefix), or None."""
    name = model.lower().rsplit("/", 1)[-1]
    best = ""
    for prefix in CONTEXT_WINDOWS:
        if len(prefix) > len(best) and _matches(name, prefix):
            best = prefix
    return CONTEXT_WINDOWS[best] if best else None


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or (name.startswith(prefix) and name[len(prefix)] in SEPARATORS)


def window_of(model: str, configured: int | None) -> int | None:
    return configured if configured is not None else known_window(model)


def overflow(messages: list[dict], extra_chars: int, max_tokens: int, model: str, configured: int | None,
             estimator: TokenEstimator) -> str | None:
    """Why a call cannot fit its model's context window (the failure's detail), or None when it fits or
    the window is unknown. The prompt is estimated as the gateway estimates it for the rate limits."""
    window = window_of(model, configured)
    if window is None:
        return None
    prompt = estimator.estimate(messages, extra_chars)
    if prompt + max_tokens <= window:
        return None
    return (f"prompt of about {prompt} tokens plus max_tokens={max_tokens} exceeds the {window}-token context "
            f"window of {model!r}; not sent (set endpoint.context_window if the model's window differs)")
