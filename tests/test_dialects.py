"""Structured output against servers that each take one way of asking for JSON (llm/dialects.py).

The simulator serves one dialect and answers the others as the real servers do (llama-cpp-python's
HTTP 500 to a json_schema, OpenAI's 400 to guided_json, prose from a server that ignores them). The
preflight's probe, the gateway, the repair loop and whole builds run against it over HTTP; requests are
counted at the simulator. Also the replies of bare local servers: no usage, finish_reason null, no
rate-limit headers, model ids spelt their own way.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
from pydantic import BaseModel, Field

from facets.flows.commands import simulate
from facets.llm.dialects import DIALECTS, extract_json, json_schema_format, structured_request
from facets.llm.errors import FatalEndpointError
from facets.llm.gateway import Completion, Gateway
from facets.llm.journal import Journal, request_key
from facets.llm.preflight import check_endpoint, choose_structured_output
from facets.simulator.server import SimulatorConfig, max_in_window, run_simulator
from facets.llm.transport import parse_reply
from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits, Retries, Sampling

MODEL = "facets-sim"
ORDER = list(DIALECTS)  # the order `auto` tries them in
RETRIES = Retries(max_attempts=4, timeout_s=5, backoff_initial_s=0.01, backoff_max_s=0.05)
SAMPLING = Sampling(max_tokens=1000, seed=1)
SOURCES = Path(__file__).parent / "data" / "sources"
NECTAR = f"nectar={SOURCES / 'nectar' / 'data.jsonl'}"
DSP = f"dsp={SOURCES / 'dsp' / 'domain_specific_preference.json'}"


class Verdict(BaseModel):
    title: str
    summary: str
    score: int = Field(ge=1, le=5)



def endpoint(sim, **fields) -> EndpointConfig:
    return EndpointConfig(**{"base_url": sim.base_url, "api_key": "sk-test", "model": MODEL,
                             "limits": RateLimits(rpm=0, max_in_flight=16), "retries": RETRIES, **fields})


def ask(i: int) -> list[dict]:
    return [{"role": "system", "content": "You answer briefly."},
            {"role": "user", "content": f"Question {i}: why tides?"}]


def gateway_run(config: EndpointConfig, body, journal: Journal | None = None):
    async def main():
        async with Gateway(config, journal) as gateway:
            return await body(gateway), gateway

    return asyncio.run(main())


def choose(config: EndpointConfig, journal: Journal | None = None) -> EndpointConfig:
    return asyncio.run(choose_structured_output(config, [MODEL], journal))


# -- what each dialect sends ------------------------------------------------------------------------

def test_each_dialect_sends_its_own_fields_and_never_shares_a_journal_key():
    calls = {}
    for dialect in ORDER:
        gateway = Gateway(EndpointConfig(base_url="http://127.0.0.1:9/v1", model=MODEL, structured_output=dialect))
        calls[dialect] = gateway.prepare(ask(1), SAMPLING, schema=Verdict)
    bodies = {d: c.body for d, c in calls.items()}
    assert bodies["json_schema"]["response_format"]["type"] == "json_schema"
    assert bodies["json_schema"]["response_format"]["json_schema"]["strict"] is True
    assert bodies["json_object"]["response_format"]["type"] == "json_object"
    assert bodies["json_object"]["response_format"]["schema"]["required"] == ["title", "summary", "score"]
    assert "response_format" not in bodies["guided_json"] and bodies["guided_json"]["guided_json"]["type"] == "object"
    prompt = bodies["prompt"]
    assert "response_format" not in prompt and "guided_json" not in prompt
    assert prompt["messages"][0] == ask(1)[0] and len(prompt["messages"]) == 2, "said in the last user turn"
    assert prompt["messages"][1]["content"].startswith(ask(1)[1]["content"])
    assert "Reply with only a JSON object matching this JSON schema: {" in prompt["messages"][1]["content"]
    assert len({c.key for c in calls.values()}) == len(ORDER)
    # json_schema keeps the key it had before there were dialects: journals of earlier builds stay valid
    before = request_key("http://127.0.0.1:9/v1", MODEL, ask(1), json_schema_format(Verdict),
                         SAMPLING.request_fields(), None)
    assert calls["json_schema"].key == before
    assert Gateway(EndpointConfig(base_url="http://127.0.0.1:9/v1", model=MODEL)).prepare(
        ask(1), SAMPLING, schema=Verdict).key == before, "auto before a preflight is json_schema"


def test_the_json_of_a_reply_in_words_is_taken_out_of_it():
    obj = '{"ok": true, "inner": {"a": [1, 2]}}'
    assert extract_json(f"Sure! Here it is:\n```json\n{obj}\n```\nAnything else?") == obj
    assert extract_json(f"```\n{obj}\n```") == obj
    assert extract_json(f"The answer is {obj}, as asked.") == obj
    assert extract_json(f"<think>maybe {{\"ok\": false}}</think>\n{obj}") == obj
    assert extract_json("no JSON here") == "no JSON here"
    request = structured_request("prompt", Verdict)
    assert request.extracts and not structured_request("json_object", Verdict).extracts


# -- the preflight's choice -------------------------------------------------------------------------

@pytest.mark.parametrize("dialect", ORDER)
def test_auto_picks_the_one_dialect_the_server_takes(dialect, caplog):
    caplog.set_level(logging.INFO, logger="facets.llm.preflight")
    with run_simulator(structured_output=dialect) as sim:
        chosen = choose(endpoint(sim))
        stats = sim.stats()
    assert chosen.structured_output == dialect
    assert stats["requests"] == ORDER.index(dialect) + 1, "one probe per dialect tried, in order"
    assert f"structured output: {dialect} ({DIALECTS[dialect]}) for model {MODEL}" in caplog.text


def test_probes_are_journaled_so_a_rerun_sends_none(tmp_path):
    with run_simulator(structured_output="json_object") as sim:
        assert choose(endpoint(sim), Journal(str(tmp_path))).structured_output == "json_object"
        first = sim.stats()["requests"]
        sim.reset_stats()
        assert choose(endpoint(sim), Journal(str(tmp_path))).structured_output == "json_object"
        again = sim.stats()["requests"]
    assert (first, again) == (2, 0)


def test_a_forced_dialect_the_server_refuses_stops_in_one_line_after_one_request():
    with run_simulator(structured_output="json_object") as sim:
        with pytest.raises(FatalEndpointError) as stop:  # the refusal itself, not a stall after retries
            choose(endpoint(sim, structured_output="json_schema"))
        requests = sim.stats()["requests"]
    message = str(stop.value)
    assert requests == 1
    assert "\n" not in message and "json_schema: http_500" in message
    assert "Input should be 'text' or 'json_object'" in message
    assert "structured_output to auto" in message


def test_no_dialect_answering_stops_in_one_line_naming_each_answer():
    with run_simulator(faults={"invalid_json": 1.0}) as sim:
        with pytest.raises(FatalEndpointError) as stop:
            choose(endpoint(sim))
        requests = sim.stats()["requests"]
    message = str(stop.value)
    assert requests == len(ORDER) and "\n" not in message
    for dialect in ORDER:
        assert f"{dialect}: schema_mismatch" in message


def test_a_bad_key_stays_fatal_in_the_probe():
    with run_simulator(api_key="right") as sim:
        with pytest.raises(FatalEndpointError, match="401"):
            choose(endpoint(sim, api_key="wrong"))
        assert sim.stats()["requests"] == 1, "no other dialect is tried"


# -- the gateway in each dialect ----------------------------------------------------------------------

@pytest.mark.parametrize("dialect", ORDER)
def test_repair_works_in_every_dialect(dialect, tmp_path):
    """Broken replies are sent back with the error; the repair re-sends the dialect's own body, so a
    server that takes only that dialect answers it. Run again, everything comes from the journal."""
    n = 16

    async def body(gateway):
        return await asyncio.gather(*(gateway.parse(ask(i), Verdict, stage="t", key=f"k{i}", sampling=SAMPLING)
                                      for i in range(n)))

    with run_simulator(structured_output=dialect, faults={"invalid_json": 0.3}, seed=5) as sim:
        config = endpoint(sim, structured_output=dialect)
        results, gateway = gateway_run(config, body, Journal(str(tmp_path)))
        stats = sim.stats()
        sim.reset_stats()
        again, _ = gateway_run(config, body, Journal(str(tmp_path)))
        rerun = sim.stats()["requests"]
    assert all(isinstance(r, Completion) and isinstance(r.value, Verdict) for r in results)
    assert stats["faults"]["invalid_json"] > 0 and stats["requests"] == n + stats["faults"]["invalid_json"]
    assert not stats["errors"], "the server never refused a request"
    assert [r.value for r in again] == [r.value for r in results] and rerun == 0


# -- bare servers ---------------------------------------------------------------------------------

def test_replies_without_usage_are_counted_by_estimate_not_as_zero():
    async def body(gateway):
        for i in range(6):
            await gateway.chat(ask(i), stage="t", key=f"k{i}", sampling=SAMPLING)
        return gateway.usage.summary()

    with run_simulator(no_usage=True) as sim:
        usage, _ = gateway_run(endpoint(sim), body)
        stats = sim.stats()
    assert usage["ok"] == 6
    for kind in ("prompt_tokens", "completion_tokens"):  # the simulator's own count of what it read and wrote
        assert stats[kind] / 2 <= usage[kind] <= stats[kind] * 2, (kind, usage[kind], stats[kind])


def test_a_null_finish_reason_is_a_stop_unless_the_reply_is_empty(tmp_path):
    async def body(gateway):
        return await gateway.parse(ask(1), Verdict, stage="t", key="k", sampling=SAMPLING)

    with run_simulator(null_finish_reason=True) as sim:
        result, gateway = gateway_run(endpoint(sim), body, Journal(str(tmp_path)))
    assert isinstance(result, Completion)
    assert Journal(str(tmp_path)).get(result.key).finish_reason == "stop"
    reply = parse_reply({"choices": [{"message": {"content": "hi"}, "finish_reason": None},
                                     {"message": {"content": None}, "finish_reason": None}]}, {})
    assert reply.finish_reasons == ["stop", ""]


def test_without_rate_headers_calls_are_paced_by_the_configured_rpm():
    rpm, burst_s, n = 600, 0.2, 12  # 10 a second, 2 at once

    async def body(gateway):
        started = time.monotonic()
        await asyncio.gather(*(gateway.chat(ask(i), stage="t", key=f"k{i}", sampling=SAMPLING) for i in range(n)))
        return time.monotonic() - started

    with run_simulator(no_rate_headers=True, rpm=6000) as sim:
        raw = urllib.request.Request(f"{sim.base_url}/chat/completions", method="POST",
                                     data=orjson.dumps({"model": MODEL, "messages": ask(0)}))
        with urllib.request.urlopen(raw, timeout=10) as reply:
            assert not [h for h in reply.headers if h.lower().startswith("x-ratelimit")]
        sim.reset_stats()
        elapsed, _ = gateway_run(endpoint(sim, limits=RateLimits(rpm=rpm, burst_s=burst_s, max_in_flight=16)), body)
        stats = sim.stats(timestamps=True)
    assert stats["ok"] == n
    assert elapsed >= (n - rpm / 60 * burst_s) / (rpm / 60) * 0.9
    assert max_in_window(stats["admitted_timestamps"], 0.5) <= rpm / 60 * (burst_s + 0.5 + 0.3)


def test_model_ids_that_differ_in_case_prefix_or_extension_are_accepted_with_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="facets.llm.preflight")
    with run_simulator(models=("models/SmolLM2.gguf",)) as sim:
        config = endpoint(sim)
        assert asyncio.run(check_endpoint(config, ["smollm2"])) == ["models/SmolLM2.gguf"]
        assert asyncio.run(check_endpoint(config, ["Smollm2.gguf"])) == ["models/SmolLM2.gguf"]
        with pytest.raises(FatalEndpointError, match="does not serve 'smollm3'"):
            asyncio.run(check_endpoint(config, ["smollm3"]))
    assert "'smollm2' is served as 'models/SmolLM2.gguf'" in caplog.text


def test_simulate_cli_takes_the_dialect_and_bare_server_flags():
    config = SimulatorConfig(structured_output="json_object", no_usage=True, no_rate_headers=True,
                             null_finish_reason=True)
    parser = argparse.ArgumentParser()
    simulate.configure(parser)
    args = config.cli_args()
    assert "--no-usage" in args and "--structured-output" in args
    parsed = vars(parser.parse_args(args))
    assert SimulatorConfig.model_validate({k: v for k, v in parsed.items() if v is not None}) == config


# -- whole builds ---------------------------------------------------------------------------------

def build_config(sim_url: str, data_dir: Path, **overrides) -> BuildConfig:
    endpoint_ = EndpointConfig(base_url=sim_url, api_key="sk-test", model=MODEL, limits=RateLimits(rpm=60_000),
                               retries=Retries(timeout_s=2, backoff_initial_s=0.05, backoff_max_s=0.5, max_attempts=6),
                               **overrides.pop("endpoint", {}))
    values = dict(sources=[NECTAR, DSP], limit=2, shard_size=2, data_dir=str(data_dir), endpoint=endpoint_,
                  publish=False)
    return BuildConfig(**{**values, **overrides})


@pytest.mark.parametrize("dialect", ORDER)
def test_a_small_build_completes_against_a_server_of_each_dialect(dialect, tmp_path, prefect_server):
    from facets.flows.build import build_collection
    from facets.pipeline.report import BuildReport
    from facets.storage import Store

    with run_simulator(structured_output=dialect, seed=2) as sim:
        report = asyncio.run(build_collection(build_config(sim.base_url, tmp_path, publish=True)))
        stats = sim.stats()
    assert report["accepted"] == 2 and report["structured_output"] == dialect
    refused_probes = {"json_schema": 0, "json_object": 1, "guided_json": 2, "prompt": 0}[dialect]
    assert sum(stats["errors"].values()) == refused_probes, "nothing refused after the probe"
    assert len(Store(str(tmp_path)).read("preference_trees").to_pylist()) >= 2
    assert f"structured output: {dialect} ({DIALECTS[dialect]})" in BuildReport(**report).text()
    card = (Path(report["release"]["path"]) / "README.md").read_text()
    assert f"Structured output was asked for as `{dialect}`." in card


def test_a_build_forced_to_a_dialect_the_server_refuses_stops_before_any_paid_work(tmp_path, prefect_server):
    from facets.flows.build import build_collection

    with run_simulator(structured_output="json_object") as sim:
        with pytest.raises(FatalEndpointError) as stop:
            asyncio.run(build_collection(build_config(sim.base_url, tmp_path,
                                                      endpoint={"structured_output": "json_schema"})))
        stats = sim.stats()
    assert stats["requests"] == 1 and stats["ok"] == 0
    assert "\n" not in str(stop.value) and "json_schema" in str(stop.value)


def test_the_build_command_takes_the_dialect_as_a_flag():
    import argparse

    from facets.flows.commands import build as command

    parser = argparse.ArgumentParser()
    command.configure(parser)
    assert command.load_config(parser.parse_args([])).endpoint.structured_output == "auto"
    chosen = command.load_config(parser.parse_args(["--structured-output", "json_object"]))
    assert chosen.endpoint.structured_output == "json_object"
