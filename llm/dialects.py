"""How a structured call asks an OpenAI-compatible server for JSON matching a schema.

Servers differ: OpenAI, Ollama, vLLM and llama.cpp's own server take a strict `json_schema` response
format; llama-cpp-python's server takes only `{"type": "json_object", "schema": ...}` (and answers a
json_schema with an HTTP 500); vLLM before 0.12 also takes the schema as an extra body field,
`guided_json` (0.12 removed it; json_schema serves there); a server with none of these can still be
asked in words (`prompt`), its JSON taken out of the reply.
A dialect decides the request fields added, the messages (only `prompt` changes them) and the part of
the journal key that tells the dialects apart, so two dialects never share a journal entry.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel

# the order `auto` tries them in: the most widely served, strictest first
DIALECTS: dict[str, str] = {
    "json_schema": "OpenAI-style",
    "json_object": "llama.cpp-style",
    "guided_json": "vLLM-style",
    "prompt": "schema in the prompt",
}
INSTRUCTION = "Reply with only a JSON object matching this JSON schema: "
_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_THINKING = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class StructuredRequest:
    """What one dialect adds to a request for one schema."""

    dialect: str
    fields: dict  # added to the request body (response_format, guided_json), shared read-only
    key: dict  # enters the journal key as its `response_format`
    instruction: str | None  # `prompt`: said at the end of the last user turn
    extra_chars: int  # the fields' length as JSON, for token estimates

    def messages(self, messages: list[dict]) -> list[dict]:
        return messages if self.instruction is None else with_instruction(messages, self.instruction)

    @property
    def extracts(self) -> bool:
        """The reply is prose around the JSON, which is taken out of it before validation."""
        return self.instruction is not None


def concrete(setting: str) -> str:
    """The dialect of an endpoint setting: `auto` not yet resolved by a preflight means json_schema."""
    return "json_schema" if setting == "auto" else setting


def describe(dialect: str) -> str:
    return f"{dialect} ({DIALECTS[dialect]})"


def structured_request(dialect: str, schema: type[BaseModel]) -> StructuredRequest:
    if dialect not in DIALECTS:
        raise ValueError(f"unknown structured-output dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    if dialect == "json_schema":
        response_format = json_schema_format(schema)
        # the key is the response format alone, as it was before there were dialects: journals stay valid
        return _request(dialect, {"response_format": response_format}, response_format)
    strict = strict_schema(schema.model_json_schema())
    if dialect == "json_object":
        response_format = {"type": "json_object", "schema": strict}
        return _request(dialect, {"response_format": response_format}, response_format)
    if dialect == "guided_json":
        fields = {"guided_json": strict}
        return _request(dialect, fields, fields)
    instruction = INSTRUCTION + orjson.dumps(strict).decode()
    return StructuredRequest(dialect, {}, {"dialect": "prompt"}, instruction, 0)


def _request(dialect: str, fields: dict, key: dict) -> StructuredRequest:
    return StructuredRequest(dialect, fields, key, None, len(orjson.dumps(fields)))


def json_schema_format(schema: type[BaseModel]) -> dict:
    """A strict `json_schema` response format derived from the model."""
    return {
        "type": "json_schema",
        "json_schema": {"name": schema.__name__, "schema": strict_schema(schema.model_json_schema()), "strict": True},
    }


def strict_schema(node: Any) -> Any:
    """Strict mode wants every property required and no additional properties, recursively; a grammar
    built from the schema (llama.cpp, vLLM) then leaves out no field either."""
    if isinstance(node, dict):
        node = {k: strict_schema(v) for k, v in node.items()}
        if node.get("type") == "object" and "properties" in node:
            node["required"] = list(node["properties"])
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    return node


def with_instruction(messages: list[dict], instruction: str) -> list[dict]:
    """The instruction said at the end of the last user turn: a turn of its own after it, or a second
    system message, breaks chat templates that want roles to alternate or the system message first."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            changed = {**message, "content": f"{message['content']}\n\n{instruction}"}
            return [*messages[:index], changed, *messages[index + 1:]]
    return [*messages, {"role": "user", "content": instruction}]


def extract_json(text: str) -> str:
    """The JSON object of a reply in words: inside a ```json fence if there is one, from the first `{`
    to the last `}`. A reply with no object comes back as it is, and fails validation as invalid JSON."""
    text = _THINKING.sub("", text)
    fenced = _FENCE.search(text)
    if fenced and "{" in fenced.group(1):
        text = fenced.group(1)
    start, end = text.find("{"), text.rfind("}")
    return text[start:end + 1] if 0 <= start < end else text.strip()
