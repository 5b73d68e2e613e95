"""`facets build` and `facets eval` against a real OpenAI-compatible model server: llama-cpp-python's
server with SmolLM2-135M-Instruct on loopback (tests/llama_server.py), the CLI in subprocesses as a user
runs it, OPENAI_BASE_URL pointing at the server.

That server refuses a `json_schema` response format (HTTP 500) and takes `{"type": "json_object",
"schema": ...}`, so the build's preflight must settle on json_object before any stage call. A 135M model
on a few CPU cores may fail the stages' checks: the build then has to stop early by itself with a
non-zero exit and one line; either way it ends, within the timeouts below, never spinning.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llama_server import MODEL_ALIAS, llama_server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent
NECTAR = f"nectar={ROOT / 'data/sources/nectar/data.jsonl'}"
MT_BENCH = f"mt_bench={ROOT / 'data/bench/mt_bench'}"
BUILD_TIMEOUT_S = 1800  # one instruction is ~10 calls of 1-3 min each on 2 busy cores; an early stop is sooner
EVAL_TIMEOUT_S = 600
# What a user of a small local server would set: calls that take minutes, so a client timeout far above
# them (a timed-out call keeps the server busy while its retry waits behind it); the early stop judged
# after 5 calls instead of 50; replies of the later stages no longer than their checks allow.
BUILD_CONFIG = {
    "endpoint": {"retries": {"timeout_s": 900, "max_attempts": 2}, "failure_window": 5},
    "stages": {"system_messages": {"sampling": {"max_tokens": 768}},
               "responses": {"sampling": {"max_tokens": 1024}}},
}


def facets(args: list[str], env: dict, timeout_s: float, log: Path) -> subprocess.CompletedProcess:
    """The CLI in a process group of its own; past the timeout the whole group is killed and the test fails.
    What it printed, its exit status and wall time are kept in `log` (the numbers a reader of a slow run wants)."""
    command = [sys.executable, "-m", "facets.flows.cli", *args]
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"`facets {args[0]}` did not end within {timeout_s} s:\n{err[-3000:]}")
    log.write_text(f"exit {process.returncode} after {time.monotonic() - started:.1f} s\n{out}\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **extra}


def parquet_rows(folder: Path) -> list[dict]:
    return [row for path in sorted(folder.glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def chat_calls(server) -> dict[str, int]:
    """Chat completions the server itself logged, by HTTP status."""
    statuses = re.findall(r'"POST /v1/chat/completions HTTP/1\.1" (\d{3})', server.log_path.read_text(errors="replace"))
    return {status: statuses.count(status) for status in set(statuses)}


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"facets {command}: error:")]


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_build_against_llama_cpp_server_picks_json_object_and_ends_by_itself(llama_server, tmp_path):
    data = tmp_path / "data"
    config = tmp_path / "build.json"
    config.write_text(json.dumps(BUILD_CONFIG))
    env = environment(OPENAI_BASE_URL=llama_server.base_url, OPENAI_API_KEY="sk-local")
    before = chat_calls(llama_server)
    done = facets(["build", "--source", NECTAR, "--limit", "1", "--shard-size", "1", "--sets", "2",
                   "--model", MODEL_ALIAS, "--max-in-flight", "2", "--data-dir", str(data), "--config", str(config),
                   "--quiet"], env, BUILD_TIMEOUT_S, tmp_path / "build.log")
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output[-3000:]
    assert "structured output: json_object" in output, output[-3000:]
    calls = {status: n - before.get(status, 0) for status, n in chat_calls(llama_server).items()}
    assert calls.get("500") == 1, f"only the json_schema probe was refused, no stage call used it: {calls}"
    assert calls.get("200", 0) >= 2, f"the json_object probe and stage calls reached the server: {calls}"
    trees = parquet_rows(data / "stages" / "preference_trees")
    if done.returncode == 0:
        assert "accepted 1 of 1 instructions" in done.stdout
        assert trees, "an accepted instruction has its preference tree"
    else:  # the model failed the checks: an early stop, said in one line
        errors = error_lines(done.stderr, "build")
        assert len(errors) == 1 and "stopped early" in errors[0], done.stderr[-3000:]
        assert parquet_rows(data / "failures"), "the rejected replies are kept with their reasons"
    for tree in trees:  # made by the model, through the json_object dialect, and valid
        assert tree["model"] == MODEL_ALIAS
        assert sorted(d["dimension"] for d in tree["dimensions"]) == sorted(
            ["style", "background_knowledge", "informativeness", "harmlessness"])
        assert all(len(d["subdimensions"]) >= 3 for d in tree["dimensions"])


@pytest.mark.timeout(2 * EVAL_TIMEOUT_S + 120)
def test_eval_run_generates_with_llama_cpp_server_and_ends_by_itself(llama_server, tmp_path):
    data = tmp_path / "data"
    # the bench's own stages on the loopback simulator (no endpoint set): the model under test is the server
    bench = facets(["bench", "build", "--source", MT_BENCH, "--per-benchmark", "1", "--data-dir", str(data)],
                   environment(), EVAL_TIMEOUT_S, tmp_path / "bench.log")
    assert bench.returncode == 0, bench.stderr[-3000:]
    before = chat_calls(llama_server).get("200", 0)
    done = facets(["eval", "run", "--data-dir", str(data), "--limit", "1", "--model", MODEL_ALIAS,
                   "--base-url", llama_server.base_url, "--max-tokens", "128", "--max-in-flight", "2", "--runs", "1"],
                  environment(), EVAL_TIMEOUT_S, tmp_path / "eval.log")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert chat_calls(llama_server).get("200", 0) - before == 1, "one bench item, one generation"
    responses = parquet_rows(next((data / "evals").glob("*/responses")))
    assert [r["model"] for r in responses] == [MODEL_ALIAS]
    assert responses[0]["text"].strip() and responses[0]["finish_reason"] in ("stop", "length")
    assert f"| {MODEL_ALIAS} |" in done.stdout
