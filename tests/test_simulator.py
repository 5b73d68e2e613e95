"""The loopback simulator, spoken to over real HTTP with the real `openai` client."""
from __future__ import annotations

import argparse
import io
import json
import random
import time
import urllib.request
from typing import Literal

import openai
import orjson
import pytest
from pydantic import BaseModel, Field, ValidationError

from facets.flows.commands import simulate
from facets.simulator.fake_text import count_tokens, schema_instance
from facets.llm.limiter import parse_reset
from facets.simulator.server import (
    FAULT_KINDS,
    SimulatorConfig,
    SimulatorProcess,
    format_duration,
    max_in_window,
    run_simulator,
)

PHRASES = ("concise step-by-step answers", "a warm, encouraging tone")
PROSE_PROMPT = f'Write a system message that weaves in "{PHRASES[0]}" and "{PHRASES[1]}".'


class Preference(BaseModel):
    dimension: Literal["style", "background_knowledge", "informativeness", "harmlessness"]
    subdimension: str = Field(min_length=3, max_length=40)
    preference: str
    description: str
    weight: float = Field(ge=0, le=1)


class Subtree(BaseModel):
    subdimension: str
    preferences: list[Preference] = Field(min_length=2, max_length=3)


class Dimension(BaseModel):
    name: str
    subtrees: list[Subtree] = Field(min_length=1, max_length=2)
    rank: int = Field(ge=1, le=4)


class Tree(BaseModel):
    dimensions: list[Dimension] = Field(min_length=4, max_length=4)
    notes: str | None = None
    approved: bool
    scores: dict[str, int]


class Node(BaseModel):
    label: str
    children: list[Node] = []


def client(sim, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=sim.base_url, api_key=kw.pop("api_key", "x"), max_retries=0, **kw)


def ask(c: openai.OpenAI, content: str = PROSE_PROMPT, **kw):
    return c.chat.completions.create(model=kw.pop("model", "sim"), messages=[{"role": "user", "content": content}], **kw)


def schema_format(model: type[BaseModel]) -> dict:
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema(),
                                                   "strict": True}}


# --- structured output ----------------------------------------------------------------------

def test_json_schema_reply_validates_against_nested_model():
    with run_simulator() as sim:
        c = client(sim)
        for i in range(10):
            reply = ask(c, f"tree {i}", response_format=schema_format(Tree))
            tree = Tree.model_validate_json(reply.choices[0].message.content)
            assert reply.choices[0].finish_reason == "stop"
            assert len(tree.dimensions) == 4
        # enum values rotate over sibling items, so the four dimensions differ
        prefs = [p.dimension for d in tree.dimensions for s in d.subtrees for p in s.preferences]
        assert len(set(prefs)) > 1
        assert tree.dimensions[0].subtrees[0].preferences[0].description.endswith(".")


def test_strict_schema_from_openai_parse_helper():
    with run_simulator() as sim:
        parsed = client(sim).chat.completions.parse(
            model="sim", messages=[{"role": "user", "content": "tree"}], response_format=Subtree)
        assert isinstance(parsed.choices[0].message.parsed, Subtree)


def test_schema_instance_covers_keywords():
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object", "additionalProperties": False,
        "required": ["root", "code", "pair", "pick", "ratio", "tags", "extra", "maybe", "when"],
        "properties": {
            "root": {"$ref": "#/$defs/Node"},
            "code": {"const": "v1"},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
            "pick": {"anyOf": [{"type": "string", "minLength": 50, "maxLength": 60}, {"type": "null"}]},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 3, "maxItems": 3},
            "extra": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 5}},
            "maybe": {"type": ["string", "null"], "maxLength": 4},
            "when": {"type": "string", "format": "date-time"},
        },
        "$defs": Node.model_json_schema()["$defs"],  # recursive: children are Nodes
    }
    for seed in range(30):
        instance = schema_instance(schema, random.Random(seed))
        jsonschema.validate(instance, schema)
        Node.model_validate(instance["root"])
    for seed in range(5):
        jsonschema.validate(schema_instance(schema, random.Random(seed), dull=True), schema)


# --- prose, determinism, lengths ------------------------------------------------------------

def test_prose_is_second_person_and_weaves_quoted_phrases():
    with run_simulator(response_tokens=120) as sim:
        reply = ask(client(sim))
        text = reply.choices[0].message.content
        assert text.startswith("You ")
        assert all(p in text for p in PHRASES)
        assert reply.usage.prompt_tokens == count_tokens(PROSE_PROMPT)
        assert reply.usage.completion_tokens == count_tokens(text)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
        assert reply.usage.prompt_tokens_details.cached_tokens == 0
        assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"


def test_same_request_same_content_other_seed_differs():
    with run_simulator(seed=1) as one, run_simulator(seed=2) as two:
        first, again = ask(client(one)), ask(client(one))
        other = ask(client(two))
        assert first.choices[0].message.content == again.choices[0].message.content
        assert first.id != again.id
        assert other.choices[0].message.content != first.choices[0].message.content
        several = ask(client(one), n=3)
        assert len({ch.message.content for ch in several.choices}) == 3
        assert [ch.index for ch in several.choices] == [0, 1, 2]


def test_max_tokens_cuts_reply_with_finish_reason_length():
    with run_simulator() as sim:
        reply = ask(client(sim), max_tokens=7)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 7 == count_tokens(reply.choices[0].message.content)
        reply = ask(client(sim), max_completion_tokens=9, response_format=schema_format(Tree))
        assert reply.choices[0].finish_reason == "length"
        with pytest.raises(json.JSONDecodeError):
            json.loads(reply.choices[0].message.content)


# --- rate limits ----------------------------------------------------------------------------

def test_rpm_limit_gives_429_with_retry_headers():
    with run_simulator(rpm=60, burst_s=2) as sim:  # a bucket of 2 requests refilling 1 per second
        c = client(sim)
        raw = c.chat.completions.with_raw_response.create(model="sim", messages=[{"role": "user", "content": "hi"}])
        assert raw.headers["x-ratelimit-limit-requests"] == "60"
        assert raw.headers["x-ratelimit-remaining-requests"] == "1"
        assert 0.9 <= parse_reset(raw.headers["x-ratelimit-reset-requests"]) <= 1.0  # OpenAI's "1s" / "950ms" form
        ask(c)
        with pytest.raises(openai.RateLimitError) as caught:
            ask(c)
        headers, body = caught.value.response.headers, caught.value.response.json()
        assert 900 <= int(headers["retry-after-ms"]) <= 1000
        assert 0.9 <= float(headers["retry-after"]) <= 1.0
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
        time.sleep(int(headers["retry-after-ms"]) / 1000)
        ask(c)
        stats = sim.stats()
        assert (stats["requests"], stats["ok"], stats["rate_limited"]) == (4, 3, 1)
        assert stats["errors"] == {"429": 1}


def test_tpm_limit_charges_output_tokens():
    with run_simulator(tpm=600, burst_s=10, response_tokens=150) as sim:  # 100 tokens of capacity
        c = client(sim)
        reply = ask(c)
        assert reply.usage.total_tokens > 100
        with pytest.raises(openai.RateLimitError) as caught:
            ask(c)
        assert caught.value.response.json()["error"]["type"] == "tokens"
        assert caught.value.response.headers["x-ratelimit-limit-tokens"] == "600"
        assert "x-ratelimit-limit-requests" not in caught.value.response.headers


def test_format_duration_matches_openai_style():
    assert [format_duration(s) for s in (0.12, 1, 7.66, 360, 86.4, 3723)] == \
        ["120ms", "1s", "7.66s", "6m0s", "1m26.4s", "1h2m3s"]


# --- faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["http_500", "http_503", "drop", "hang"])
def test_transport_faults(kind):
    expected = {"http_500": openai.InternalServerError, "http_503": openai.InternalServerError,
                "drop": openai.APIConnectionError, "hang": openai.APITimeoutError}[kind]
    with run_simulator(faults={kind: 1.0}, hang_s=3) as sim:
        with pytest.raises(expected) as caught:
            ask(client(sim, timeout=0.5))
        if kind.startswith("http_"):
            assert caught.value.status_code == int(kind[5:])
            assert caught.value.body["type"] == "server_error"
        stats = sim.stats()
        assert stats["faults"][kind] == 1 and stats["ok"] == stats["paid"] == 0


def test_content_faults_on_structured_replies():
    def reply(kind):
        with run_simulator(faults={kind: 1.0}) as sim:
            answer = ask(client(sim), "tree", response_format=schema_format(Tree)).choices[0]
            assert sim.stats()["faults"][kind] == 1 and sim.stats()["paid"] == 1
            return answer

    truncated = reply("truncated_json")
    assert truncated.finish_reason == "stop"
    with pytest.raises(json.JSONDecodeError):
        json.loads(truncated.message.content)
    with pytest.raises(ValidationError):
        Tree.model_validate(json.loads(reply("invalid_json").message.content))
    dull = Tree.model_validate_json(reply("off_spec").message.content)  # valid, yet empty and repeated
    assert dull.dimensions[0] == dull.dimensions[1] and dull.dimensions[0].subtrees[0].preferences[0].preference == ""
    assert reply("length").finish_reason == "length"


def test_content_faults_on_prose_replies():
    def reply(kind):
        with run_simulator(faults={kind: 1.0}) as sim:
            return ask(client(sim)).choices[0]

    with run_simulator() as sim:
        clean = ask(client(sim)).choices[0].message.content
    off = reply("off_spec").message.content
    assert off.count("\n- ") >= 2 and "you" not in off.lower() and not any(p in off for p in PHRASES)
    truncated = reply("truncated_json")
    assert truncated.finish_reason == "stop" and clean.startswith(truncated.message.content)
    assert len(truncated.message.content) < len(clean)
    assert isinstance(json.loads(reply("invalid_json").message.content), dict)
    length = reply("length")
    assert length.finish_reason == "length" and clean.startswith(length.message.content)


def test_faults_are_drawn_per_arrival_so_a_retry_can_succeed():
    with run_simulator(seed=5) as clean_sim:
        expected = ask(client(clean_sim)).choices[0].message.content
    with run_simulator(seed=5, faults={"http_500": 0.5}) as sim:
        c, answers = client(sim), []
        for _ in range(20):
            try:
                answers.append(ask(c).choices[0].message.content)
            except openai.InternalServerError:
                pass
        stats = sim.stats()
        assert 0 < stats["faults"]["http_500"] < 20 and stats["ok"] == len(answers)
        assert set(answers) == {expected}
        assert stats["paid_twice"] == len(answers) - 1


def test_fault_rate_is_split_over_kinds_not_named():
    config = SimulatorConfig(fault_rate=0.7, faults={"hang": 0.1})
    rates = config.fault_rates()
    assert rates["hang"] == 0.1 and rates["drop"] == pytest.approx(0.1)
    with pytest.raises(ValidationError):
        SimulatorConfig(faults={"gremlins": 0.1})
    with pytest.raises(ValidationError):
        SimulatorConfig(fault_rate=0.9, faults={"hang": 0.5})
    with run_simulator(fault_rate=1.0, seed=3) as sim:
        c = client(sim, timeout=0.5)
        for _ in range(40):
            try:
                ask(c)
            except (openai.APIError, openai.APITimeoutError):
                pass
        assert sum(sim.stats()["faults"].values()) == 40


# --- access ---------------------------------------------------------------------------------

def test_api_key_and_model_list():
    with run_simulator(api_key="secret", models=("gpt-a", "gpt-b")) as sim:
        with pytest.raises(openai.AuthenticationError) as caught:
            ask(client(sim, api_key="wrong"), model="gpt-a")
        assert caught.value.body["code"] == "invalid_api_key"
        good = client(sim, api_key="secret")
        with pytest.raises(openai.NotFoundError) as caught:
            ask(good, model="gpt-z")
        assert caught.value.body["code"] == "model_not_found"
        assert ask(good, model="gpt-b").model == "gpt-b"
        assert [m.id for m in good.models.list()] == ["gpt-a", "gpt-b"]
        assert sim.stats()["errors"] == {"401": 1, "404": 1}


def test_bad_requests_are_400():
    with run_simulator() as sim:
        with pytest.raises(openai.BadRequestError):
            client(sim).chat.completions.create(model="sim", messages=[])
        with pytest.raises(openai.BadRequestError):
            ask(client(sim), n=0)


# --- counters -------------------------------------------------------------------------------

def test_stats_count_paid_twice_and_window():
    with run_simulator() as sim:
        c = client(sim)
        ask(c)
        ask(c)
        ask(c, "another question")
        stats = sim.stats(timestamps=True)
        assert (stats["ok"], stats["distinct_request_hashes"], stats["paid_twice"]) == (3, 2, 1)
        assert stats["max_ok_in_window"] == 3 and len(stats["admitted_timestamps"]) == 3
        assert stats["prompt_tokens"] == 2 * count_tokens(PROSE_PROMPT) + count_tokens("another question")
        with urllib.request.urlopen(f"{sim.url}/stats?window=0.000001") as reply:
            assert orjson.loads(reply.read())["max_ok_in_window"] == 1
        urllib.request.urlopen(urllib.request.Request(f"{sim.url}/stats/reset", method="POST")).close()
        assert sim.stats()["requests"] == 0 and sim.stats()["paid_twice"] == 0


def test_max_in_window():
    assert max_in_window([0, 1, 2, 60, 61, 61.5, 62], 60) == 4
    assert max_in_window([], 60) == 0


# --- batches --------------------------------------------------------------------------------

def batch_file(bodies: list[dict]) -> io.BytesIO:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
             for i, body in enumerate(bodies)]
    return io.BytesIO(b"".join(orjson.dumps(line) + b"\n" for line in lines))


def wait_for(c: openai.OpenAI, batch_id: str, timeout_s: float = 10):
    deadline = time.monotonic() + timeout_s
    while (batch := c.batches.retrieve(batch_id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.05)
    return batch


def test_batch_end_to_end_with_openai_client():
    bodies = [{"model": "sim", "messages": [{"role": "user", "content": f"question {i}"}]} for i in range(4)]
    bodies.append({"model": "sim", "messages": [{"role": "user", "content": "tree"}],
                   "response_format": schema_format(Subtree)})
    with run_simulator(batch_delay_s=0.2) as sim:
        c = client(sim)
        upload = c.files.create(file=("in.jsonl", batch_file(bodies)), purpose="batch")
        assert upload.purpose == "batch" and c.files.retrieve(upload.id).bytes == upload.bytes
        batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"stage": "test"})
        assert batch.status == "validating" and batch.metadata == {"stage": "test"}
        done = wait_for(c, batch.id)
        assert done.status == "completed" and done.error_file_id is None
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 5, 0)
        records = [json.loads(line) for line in c.files.content(done.output_file_id).content.splitlines()]
        assert [r["custom_id"] for r in records] == [f"req-{i}" for i in range(5)]
        bodies_out = [openai.types.chat.ChatCompletion.model_validate(r["response"]["body"]) for r in records]
        Subtree.model_validate_json(bodies_out[-1].choices[0].message.content)
        assert done.usage.output_tokens == sum(b.usage.completion_tokens for b in bodies_out)
        assert [b.id for b in c.batches.list()] == [batch.id]
        # the same request answered synchronously is the same content, and paid twice
        assert ask(c, "question 0").choices[0].message.content == bodies_out[0].choices[0].message.content
        stats = sim.stats()
        assert stats["batch"]["ok"] == 5 and stats["paid_twice"] == 1


def test_batch_faults_go_to_error_file_and_cancel():
    bodies = [{"model": "sim", "messages": [{"role": "user", "content": f"q {i}"}]} for i in range(3)]
    with run_simulator(faults={"http_500": 1.0}, batch_delay_s=0.0) as sim:
        c = client(sim)
        upload = c.files.create(file=("in.jsonl", batch_file(bodies)), purpose="batch")
        done = wait_for(c, c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id)
        assert done.output_file_id is None and done.request_counts.failed == 3
        errors = [json.loads(line) for line in c.files.content(done.error_file_id).content.splitlines()]
        assert {e["response"]["status_code"] for e in errors} == {500}
        assert sim.stats()["batch"]["faults"]["http_500"] == 3
    with run_simulator(batch_delay_s=30) as sim:
        c = client(sim)
        upload = c.files.create(file=("in.jsonl", batch_file(bodies)), purpose="batch")
        batch = c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
        assert c.batches.cancel(batch.id).status == "cancelled"
        with pytest.raises(openai.BadRequestError):
            c.batches.cancel(batch.id)


def test_batch_with_bad_line_fails_validation():
    with run_simulator(batch_delay_s=0) as sim:
        c = client(sim)
        upload = c.files.create(file=("in.jsonl", io.BytesIO(b'{"custom_id": "a"}\n')), purpose="batch")
        done = wait_for(c, c.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                            completion_window="24h").id)
        assert done.status == "failed" and done.errors.data[0].line == 1


# --- command line ---------------------------------------------------------------------------

def test_cli_flags_round_trip_the_config():
    config = SimulatorConfig(rpm=120, tpm=9000, latency_ms=5.5, faults={"hang": 0.25, "drop": 0.1},
                             models=("a", "b"), api_key="k", seed=-3)
    parser = argparse.ArgumentParser()
    simulate.configure(parser)
    args = vars(parser.parse_args(config.cli_args()))
    assert SimulatorConfig.model_validate({k: v for k, v in args.items() if v is not None}) == config
    assert set(FAULT_KINDS) >= set(config.faults)


def test_cli_runs_as_a_subprocess_and_prints_its_url():
    with SimulatorProcess(seed=4, rpm=1000) as proc:
        assert proc.base_url.startswith("http://127.0.0.1:") and proc.base_url.endswith("/v1")
        reply = openai.OpenAI(base_url=proc.base_url, api_key="x", max_retries=0).chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content.startswith("You ")
        assert proc.stats()["ok"] == 1
    assert proc.process.returncode == 0
