"""build-collection end to end: the real flow on a temporary Prefect server, the real openai-compatible
simulator over HTTP, real Parquet and DuckDB. Requests are counted at the simulator, never in our code."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import re
import time
from pathlib import Path

import pytest

from facets.flows.build import build_collection
from facets.schemas.stages import LLM_STAGES
from facets.llm.errors import EndpointUnreachable, FatalEndpointError
from facets.simulator.server import SimulatorProcess, run_simulator
from facets.schemas import PreferencePairRow, PreferenceTree, SFTRow
from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits, Retries
from facets.storage import Store
from facets.tasks.pairs import choose_pair
from facets.tasks.preference_sets import choose_sets
from facets.tasks.system_messages import check_system_message
from facets.ingest.sources import SourceError

SOURCES = Path(__file__).parent / "data" / "sources"
NECTAR = f"nectar={SOURCES / 'nectar' / 'data.jsonl'}"
DSP = f"dsp={SOURCES / 'dsp' / 'domain_specific_preference.json'}"
MODEL = "facets-sim"


pytestmark = pytest.mark.usefixtures("prefect_server")


def config(sim_url: str, data_dir: Path, **overrides) -> BuildConfig:
    endpoint = EndpointConfig(base_url=sim_url, api_key="sk-test", model=MODEL, limits=RateLimits(rpm=60_000),
                              retries=Retries(timeout_s=2, backoff_initial_s=0.05, backoff_max_s=0.5, max_attempts=6))
    values = dict(sources=[NECTAR, DSP], limit=8, shard_size=4, data_dir=str(data_dir), endpoint=endpoint, publish=False)
    return BuildConfig(**{**values, **overrides})


def build(cfg: BuildConfig) -> dict:
    return asyncio.run(build_collection(cfg))


def chat_requests(sim) -> int:
    return sim.stats()["requests"]


def rows(data_dir: Path, stage: str):
    return Store(str(data_dir)).read(stage).to_pylist()


# --- end to end ---------------------------------------------------------------------------------

def test_build_with_faults_gives_exactly_n_complete_instructions_and_a_loadable_release(tmp_path):
    import datasets

    with run_simulator(seed=3, fault_rate=0.15, hang_s=3) as sim:
        report = build(config(sim.base_url, tmp_path, publish=True))
        stats = sim.stats()
    n = 8
    assert report["accepted"] == n
    assert sum(stats["faults"].values()) > 0, "faults were injected"
    # the shards' summaries add up: every drawn instruction went through the tree stage once, every accepted
    # one has its pair
    trees, pairs = report["stages"]["preference_trees"], report["stages"]["pairs"]
    assert trees["reused"] + trees["made"] + trees["failed"] == report["drawn"]
    assert pairs["reused"] + pairs["made"] == report["accepted"]
    assert stats["paid_twice"] == 0
    release = Path(report["release"]["path"])
    sft = datasets.load_dataset("parquet", data_dir=str(release / "sft"), split="train")
    small = datasets.load_dataset("parquet", data_dir=str(release / "small"), split="train")
    dpo = datasets.load_dataset("parquet", data_dir=str(release / "dpo"), split="train")
    assert (len(sft), len(small), len(dpo)) == (3 * n, n, n)
    for row in sft:
        SFTRow.model_validate(row)
        assert sorted(p["dimension"] for p in row["preference_set"]) == sorted(
            ["style", "background_knowledge", "informativeness", "harmlessness"])
    systems = {}
    for row in sft:
        systems.setdefault(row["prompt"], {})[row["output"]] = row["system"]
    for row in dpo:
        PreferencePairRow.model_validate(row)
        assert row["chosen"][0] == {"content": row["prompt"], "role": "user"}
        chosen, rejected = row["chosen"][1]["content"], row["rejected"][1]["content"]
        assert systems[row["prompt"]][chosen] == row["system"]
        assert systems[row["prompt"]][rejected] != row["system"], "rejected answers another system message"
    card = (release / "README.md").read_text()
    models_table = card.split("## Models and prompts", 1)[1].split("##", 1)[0]
    for stage in LLM_STAGES:  # one row per stage, model and prompt version side by side
        assert re.search(rf"\| {stage} \| facets-sim \| {stage}@[0-9a-f]{{12}} \|", models_table), models_table


def test_one_shard_makes_trees_at_a_time_while_others_go_on(tmp_path):
    """max_tree_shards=1: the token-heavy tree stages of shards never overlap, and a shard's system messages
    start on its first trees, before its tree stage ends (read back from Prefect)."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    began = datetime.now(timezone.utc)
    with run_simulator(seed=7, latency_ms=30, jitter_ms=25) as sim:
        report = build(config(sim.base_url, tmp_path, limit=12, shard_size=3))
    assert report["accepted"] == 12 and report["shards"] >= 3

    async def task_runs():  # the tests of this module run one at a time: these are this build's
        async with get_client() as client:
            return await client.read_task_runs(
                task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=began)))

    deadline = time.monotonic() + 30
    while True:  # task run states reach the server a moment after the flow returns
        runs = sorted(((r.start_time, r.end_time, r.name) for r in asyncio.run(task_runs()) if r.end_time))
        trees = [t for t in runs if t[2].startswith("preference_trees-")]
        if len(trees) >= report["shards"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    later = [t for t in runs if t[2].startswith(("system_messages-", "responses-"))]
    assert len(trees) == report["shards"]
    for (_, end, _), (start, _, _) in zip(trees, trees[1:]):
        assert start >= end, "two shards made trees at once"
    assert any(s < trees[-1][1] and e > trees[-1][0] for s, e, _ in later), "later stages ran beside the trees"
    tree_end = {name.split("-", 1)[1]: end for _, end, name in trees}
    systems = {name.split("-", 1)[1]: start for start, _, name in later if name.startswith("system_messages-")}
    assert any(start < tree_end[shard] for shard, start in systems.items()), "a shard's stages ran as a pipeline"


def test_small_replacement_shards_start_at_once_beside_the_others(tmp_path):
    """One shard at a time (max_concurrent_shards=1), yet the small shards drawn for failed instructions
    run while the big ones do: they wait for no shard or tree slot (read back from Prefect)."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    began = datetime.now(timezone.utc)
    with run_simulator(seed=5, latency_ms=50, faults={"length": 0.2}) as sim:
        report = build(config(sim.base_url, tmp_path, limit=64, shard_size=32, max_concurrent_shards=1))
    # a few instructions of each big shard lose a call for good: their replacements (under 32 / 4) are small
    assert report["accepted"] == 64 and report["drawn"] > 64, "failed instructions were replaced"

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(
                task_run_filter=TaskRunFilter(start_time=TaskRunFilterStartTime(after_=began)))

    # states reach the server as events, a moment later (later still on a busy machine): read them until
    # the replacements are there and two reads in a row agree
    spans: dict[str, list] = {}
    previous, deadline = None, time.monotonic() + 60
    while time.monotonic() < deadline:
        spans = {}
        for run in asyncio.run(task_runs()):
            if run.end_time and not run.name.startswith("ingest"):
                shard = run.name.split("-", 1)[1]
                start, end = spans.get(shard, (run.start_time, run.end_time))
                spans[shard] = (min(start, run.start_time), max(end, run.end_time))
        if any("-draw" in name for name in spans) and spans == previous:
            break
        previous = spans
        time.sleep(1.0)
    # the replacements span the whole ring and are named by their draw: b0000-1023-draw1, -draw2, ...
    small = {name: span for name, span in spans.items() if "-draw" in name}
    big = {name: span for name, span in spans.items() if name not in small}  # the two shards of 32 (draw 0)
    assert len(big) == 2 and small and all(name.startswith("b0000-1023-draw") for name in small), spans
    assert any(s_start < end and s_end > start for s_start, s_end in small.values() for start, end in big.values()), \
        f"a replacement shard ran beside a big one: {spans}"


def test_incremental_rerun_makes_no_request_and_no_new_release(tmp_path):
    with run_simulator(seed=1) as sim:
        first = build(config(sim.base_url, tmp_path, publish=True))
        before = chat_requests(sim)
        second = build(config(sim.base_url, tmp_path, publish=True))
        again = chat_requests(sim) - before
    assert first["stages"]["preference_trees"]["failed"] > 0, "some trees failed: a rerun must not ask them again"
    assert again == 0, "N instructions are complete: nothing is asked, not even the failures"
    assert all(second["stages"][stage]["made"] == 0 for stage in second["stages"])
    assert second["stages"]["responses"] == {"reused": 24, "made": 0, "failed": 0}
    assert first["release"]["is_new"] and not second["release"]["is_new"]
    assert second["release"]["version"] == first["release"]["version"]


def test_changed_system_message_template_recomputes_only_what_depends_on_it(tmp_path):
    templates = tmp_path / "templates"
    templates.mkdir()
    bundled = Path(__file__).parents[1] / "tasks" / "prompts" / "system_messages.txt"
    with run_simulator(seed=2) as sim:
        first = build(config(sim.base_url, tmp_path / "data", templates_dir=str(templates)))
        before = chat_requests(sim)
        (templates / "system_messages.txt").write_text(bundled.read_text() + "\nKeep it warm.\n")
        report = build(config(sim.base_url, tmp_path / "data", templates_dir=str(templates)))
        made = chat_requests(sim) - before
    # No stored tree is made again; a tree that failed before is asked again (its repairs go on).
    trees = report["stages"]["preference_trees"]["made"]
    assert trees <= first["stages"]["preference_trees"]["failed"]
    assert report["stages"]["preference_sets"]["made"] == 3 * trees
    assert report["stages"]["system_messages"]["made"] >= 24 and report["stages"]["responses"]["made"] >= 24
    assert report["accepted"] == 8 and made >= 48, "one request per new system message and per new response"


def test_more_instructions_later_cost_only_the_new_ones(tmp_path):
    with run_simulator(seed=4) as sim:
        build(config(sim.base_url, tmp_path, limit=4))
        before = chat_requests(sim)
        report = build(config(sim.base_url, tmp_path, limit=6))
        made = chat_requests(sim) - before
    assert report["accepted"] == 6
    assert report["stages"]["preference_trees"]["reused"] == 4
    assert report["stages"]["system_messages"]["reused"] == 12 and report["stages"]["responses"]["reused"] == 12
    assert report["stages"]["responses"]["made"] == 6
    # every request the endpoint saw was for the two new instructions (or a retried failure), none for the old four
    assert made == sum(usage["requests"] for usage in report["usage"].values())
    assert made <= 3 * (2 + report["stages"]["preference_trees"]["failed"]) + 2 * 3 * 3


def test_batch_mode_builds_and_a_later_online_run_sends_nothing(tmp_path):
    with run_simulator(seed=6, batch_delay_s=0.2) as sim:
        report = build(config(sim.base_url, tmp_path, limit=4, mode="batch", batch_poll_s=0.1))
        batch = sim.stats()["batch"]
        assert report["accepted"] == 4
        assert batch["batches"] >= 3 and batch["ok"] >= 4 + 12 + 12
        before = chat_requests(sim)
        online = build(config(sim.base_url, tmp_path, limit=4))
        again = chat_requests(sim) - before
    assert again == 0, "batch results, repaired ones included, are journaled like online ones"
    assert online["stages"]["responses"] == {"reused": 12, "made": 0, "failed": 0}


def test_push_to_hub_offline_fails_with_one_line_and_keeps_the_release(tmp_path):
    with run_simulator(seed=7) as sim:
        env = {**os.environ, "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "build", "--source", NECTAR, "--limit", "2",
                               "--data-dir", str(tmp_path), "--model", MODEL, "--rpm", "60000", "--quiet",
                               "--push-to-hub", "someone/multifaceted"], env=env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 2
    assert "someone/multifaceted" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "releases" / "LATEST").exists()


@pytest.mark.slow
def test_kill_9_mid_build_then_rerun_pays_at_most_the_in_flight_calls_again(tmp_path):
    in_flight = 8
    with SimulatorProcess(seed=5, latency_ms=150, jitter_ms=50) as sim:
        env = {**os.environ, "OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-test"}
        command = [sys.executable, "-m", "facets.flows.cli", "build", "--source", NECTAR, "--source", DSP,
                   "--limit", "12", "--shard-size", "4", "--data-dir", str(tmp_path), "--model", MODEL,
                   "--max-in-flight", str(in_flight), "--rpm", "60000", "--quiet"]
        victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.monotonic() + 120
        while sim.stats()["ok"] < 40 and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.05)
        assert victim.poll() is None, "the build ended before it could be killed"
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        stats = sim.stats()
    # Every reply that came back before the kill was journaled as it came, the rejected ones too (a rerun
    # goes on with their repairs): only the calls in flight at the kill are paid again.
    assert "release" in done.stdout
    assert stats["paid_twice"] <= in_flight
    assert len(rows(tmp_path, "pairs")) >= 12


def test_train_after_starts_the_train_deployment_and_that_run_trains_on_the_built_release(tmp_path):
    """The trigger, and the trap of a release that only looks right: the run's own config trains a step on it."""
    pytest.importorskip("torch", reason="the training extra (torch) is installed by `make test`")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    from facets.flows.train import train as train_flow
    from facets.schemas.training import TrainConfig
    from facets.training.run import train
    from training_fixtures import corpus, tiny_mistral

    deployment_id = train_flow.to_deployment(name="sft-test").apply()
    model = tiny_mistral(tmp_path / "tiny", corpus())
    overrides = {"method": "sft", "base_model": str(model), "device": "cpu", "max_steps": 1, "precision": "fp32",
                 "max_length": 4096, "batch_size": 2, "global_batch_size": 2}
    with run_simulator(seed=5) as sim:
        report = build(config(sim.base_url, tmp_path / "data", limit=3, publish=True, train_after=True,
                              train={"deployment": "train/sft-test", "config": overrides}))
    release = report["release"]
    assert release["is_new"] and release["train_run"]

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

    (run,) = asyncio.run(runs())
    assert str(run.id) == release["train_run"]
    given = run.parameters["config"]
    assert given["release"] == release["path"]
    assert given["output_dir"] == f"{tmp_path / 'data'}/models/{release['version']}-sft"
    result = train(TrainConfig.model_validate(given))  # what the worker would run, in this process
    assert result.steps == 1 and result.lengths["kept"] > 0 and result.final_loss == result.final_loss


def test_train_after_without_the_deployment_stops_before_any_call(tmp_path):
    with run_simulator() as sim:
        with pytest.raises(ValueError, match="no deployment train/nowhere"):
            build(config(sim.base_url, tmp_path, train_after=True, train={"deployment": "train/nowhere"}))
        assert chat_requests(sim) == 0


def test_a_bad_train_after_config_is_refused_with_the_config():
    with pytest.raises(ValueError, match="learning_rate"):
        BuildConfig(train_after=True, train={"config": {"method": "dpo", "learning_rate": 0}})
    with pytest.raises(ValueError, match="must not name a release"):
        BuildConfig(train={"config": {"method": "sft", "release": "x"}})


# --- bad config: a clear message before any paid call ---------------------------------------------

def test_unknown_stage_model_stops_before_any_call(tmp_path):
    with run_simulator(models=(MODEL,)) as sim:
        cfg = config(sim.base_url, tmp_path, stages={"responses": {"model": "gpt-nonexistent"}})
        with pytest.raises(FatalEndpointError, match="does not serve 'gpt-nonexistent'"):
            build(cfg)
        assert chat_requests(sim) == 0


def test_unreachable_endpoint_fails_clearly(tmp_path):
    cfg = config("http://127.0.0.1:9/v1", tmp_path)
    with pytest.raises(EndpointUnreachable, match="could not be reached"):
        build(cfg)


def test_missing_source_file_fails_before_any_call(tmp_path):
    with run_simulator() as sim:
        with pytest.raises(SourceError, match="nope.jsonl"):
            build(config(sim.base_url, tmp_path, sources=[f"nectar={tmp_path / 'nope.jsonl'}"]))
        assert chat_requests(sim) == 0


def test_cli_rejects_non_positive_shard_size(tmp_path):
    done = subprocess.run([sys.executable, "-m", "facets.flows.cli", "build", "--shard-size", "0",
                           "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "shard_size" in done.stderr and "Traceback" not in done.stderr


def test_no_key_and_no_url_is_named_in_the_error(tmp_path, monkeypatch):
    from facets.llm.errors import MissingCredentials
    from facets.llm.preflight import check_endpoint

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(MissingCredentials, match="OPENAI_API_KEY"):
        asyncio.run(check_endpoint(EndpointConfig(), ["gpt-4o-mini"]))


# --- the stages' own rules ------------------------------------------------------------------------

GOOD = ("You are a patient guide for people who cook at home and want to understand why a recipe works. "
        "You explain each step in plain words, assuming your reader knows basic kitchen tools but little "
        "food science, and you offer one practical variation when it helps. You keep your answers accurate "
        "and you point out food-safety concerns calmly whenever raw ingredients are involved.")


def test_system_message_checks_accept_a_good_one():
    check_system_message(GOOD, "How do I make a sourdough starter from scratch at home?")


@pytest.mark.parametrize("text, reason", [
    ("", "too short"),
    ("You help. " * 300, "too long"),
    (GOOD + "\n- be concise\n- be safe", "list-shaped"),
    (GOOD + "\n\n" + GOOD, "more than one paragraph"),
    (GOOD.replace("You ", "The assistant ").replace("you ", "it ").replace("your ", "its "), "second person"),
    (GOOD + " How do I make a sourdough starter from scratch at home and keep it alive for weeks?", "restates"),
])
def test_system_message_checks_reject(text, reason):
    instruction = "How do I make a sourdough starter from scratch at home and keep it alive for weeks?"
    with pytest.raises(ValueError, match=reason):
        check_system_message(text, instruction)


def _tree(branches: int = 3, leaves: int = 2) -> PreferenceTree:
    dims = ["style", "background_knowledge", "informativeness", "harmlessness"]
    return PreferenceTree(instruction_id="n1-abc", fingerprint="f", model="m", dimensions=[
        {"dimension": d, "subdimensions": [
            {"subdimension": f"{d}-{b}", "preferences": [
                {"preference": f"{d}-{b}-{leaf}", "description": "what a response looks like"} for leaf in range(leaves)]}
            for b in range(branches)]} for d in dims])


def test_sets_differ_in_every_dimension_and_are_deterministic():
    sets = choose_sets(_tree(), 3, seed=0)
    assert sets == choose_sets(_tree(), 3, seed=0)
    assert [[p.dimension for p in s] for s in sets] == [["style", "background_knowledge", "informativeness", "harmlessness"]] * 3
    for dim in range(4):
        assert len({s[dim].subdimension for s in sets}) == 3
    assert choose_sets(_tree(), 3, seed=1) != sets or choose_sets(_tree(), 3, seed=2) != sets


def test_more_sets_than_branches_take_other_preferences():
    sets = choose_sets(_tree(branches=3, leaves=2), 5, seed=0)
    assert len({tuple(p.preference for p in s) for s in sets}) == 5


def test_pairs_are_deterministic_and_never_the_same_set():
    picks = [choose_pair(f"n1-{i}", 3, seed=0) for i in range(200)]
    assert picks == [choose_pair(f"n1-{i}", 3, seed=0) for i in range(200)]
    assert all(c != r for c, r in picks)
    assert {c for c, _ in picks} == {0, 1, 2}
