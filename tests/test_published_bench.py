"""The published Multifaceted Bench: read in its published layout, evaluated item for item, scored beside the
paper's Table 2; the judge prompt as the Janus script renders it; the paper's inference settings (the Mistral
text with its trailing space, repetition_penalty 1.03 where the server takes it, the no-system-message arm);
target counts and the accept list for a bench of one's own.

The local copy is built from the published records of the Janus README (real layout and column names: the
hub's `data/train-*.parquet` and a README with the data config); servers are the loopback simulator and a
small aiohttp server of the test's own that records every body it is sent."""
from __future__ import annotations

import asyncio
import csv
import json
import socket
from pathlib import Path

import pytest

from facets.schemas import Rubric
from facets.schemas.config import RateLimits
from facets.schemas.evaluation import BENCHMARKS, BenchConfig, EvalConfig, JudgeConfig, ModelSpec
from facets.storage import Store
from facets.evaluation.bench_release import Bench, BenchItem, load_bench
from facets.evaluation.judge import judge_messages, load_judge_template, summary_csv, summary_markdown, summary_png
from facets.evaluation.paper_table import PICTURE_ROWS, TABLE_2, comparability_notes
from facets.evaluation.published_bench import (
    PUBLISHED_BENCH,
    is_hub_id,
    is_published_layout,
    published_benchmark_of,
    target_counts,
)
from facets.evaluation.sources import load_bench_prompts
from published_fixtures import published_rows

DATA = Path(__file__).parent / "data"
SOURCES = [f"{name}={DATA / 'bench' / name}" for name in BENCHMARKS]


@pytest.fixture
def published_copy(tmp_path) -> Path:
    """A local copy as the hub holds it: README.md with the data config and data/train-00000-of-00001.parquet."""
    import datasets

    folder = tmp_path / "Multifaceted-Bench"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list(published_rows()).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                      "    path: data/train-*\n---\n# Multifaceted Bench (test copy)\n")
    return folder


# --- reading the published bench -------------------------------------------------------------------

def test_a_local_copy_in_the_published_layout_is_read_item_for_item(published_copy, tmp_path):
    assert is_hub_id(PUBLISHED_BENCH) and not is_hub_id(str(published_copy))
    assert is_published_layout(PUBLISHED_BENCH) and is_published_layout(str(published_copy))
    bench = load_bench(str(published_copy))
    rows = published_rows()
    assert bench.published and len(bench.items) == len(rows), "every row is an item: nothing drawn or left out"
    assert [i.prompt for i in bench.items] == [r["prompt"] for r in rows], "in the published order"
    assert [i.benchmark for i in bench.items] == ["flask", "self_instruct", "koala", "mt_bench", "alpaca_eval"]
    assert len({i.item_id for i in bench.items}) == len(rows), "a prompt under a second system message is its own item"
    assert all(len(i.rubrics) == 4 for i in bench.items)
    # the same rows as one file: the same version, so stored responses and judgments are shared
    single = tmp_path / "bench.parquet"
    single.write_bytes((published_copy / "data" / "train-00000-of-00001.parquet").read_bytes())
    assert load_bench(str(single)).version == bench.version and bench.version.startswith("published-")


def test_source_labels_map_to_benchmarks_and_flask_tasks_stay_flask():
    assert published_benchmark_of("AlpacaEval") == "alpaca_eval" and published_benchmark_of("mt_bench") == "mt_bench"
    # FLASK's own tasks named after other benchmarks keep to FLASK, as in the bench built here
    assert published_benchmark_of("Koala") == "flask" and published_benchmark_of("Self-instruct") == "flask"
    assert published_benchmark_of("Alpha-nlg (art)") == "flask"


def test_a_bench_without_the_published_columns_is_refused(tmp_path):
    import datasets

    folder = tmp_path / "other"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"instruction": "hi", "output": "hello"}]).to_parquet(str(folder / "data" / "train.parquet"))
    with pytest.raises(ValueError, match="Multifaceted-Bench layout"):
        load_bench(str(folder))


# --- the judge prompt ------------------------------------------------------------------------------

# The Janus evaluation script's prompt (utils/prompts.py) and rendering (run_eval_openai.py), for comparison
JANUS_SYSTEM = ("You are a fair judge assistant tasked with providing clear, objective feedback based on specific "
                "criteria, ensuring each assessment reflects the absolute standards set for performance.")
JANUS_USER = """
###Task Description:
An instruction (might include an Input inside it), a response to evaluate, and a score rubric representing a evaluation criteria are given.
1. Write a detailed feedback that assess the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations.

###The instruction to evaluate:
{instruction}

###Response to evaluate:
{response}

###Reference Answer (Score 5):
{reference_answer}

###Score Rubrics:
{score_rubric}

###Feedback: """


def test_the_judge_prompt_is_the_janus_scripts_byte_for_byte():
    rubric = {"criteria": "Does it use plain words \u2014 no jargon?",
              "score_descriptions": {str(i): f"level {i} \u00e9" for i in range(1, 6)}}
    item = BenchItem("i", "koala", "koala", "SYSTEM", "What is rain?", "Rain is water.", (Rubric.model_validate(rubric),) * 4)
    messages = judge_messages(load_judge_template(), item, "It is wet.", item.rubrics[0])
    expected = JANUS_USER.format(instruction="What is rain?", response="It is wet.", reference_answer="Rain is water.",
                                 score_rubric=json.dumps(rubric, indent=4)).strip()
    assert messages == [{"role": "system", "content": JANUS_SYSTEM}, {"role": "user", "content": expected}]


# --- Table 2 beside the judged models --------------------------------------------------------------

def test_table_2_rows_stand_beside_the_judged_models_labelled_published():
    from facets.evaluation.judge import summarise

    items = [BenchItem("a", "koala", "koala", "s", "p", "r", ())]
    [summary] = summarise(items, {}, ["mine"], 1)
    notes = comparability_notes(1, "gpt-4o-mini", 1)
    text = summary_markdown([summary], TABLE_2, notes)
    assert "| Janus 7B (published) | 4.43 | 4.06 | 4.41 | 4.11 | 4.01 | 4.17 | published |" in text
    assert "| Janus+DPO 7B (published) | 4.45 | 4.13 | 4.43 | 4.21 | 4.17 | 4.24 | published |" in text
    assert text.index("| mine |") < text.index("(published)")
    assert "this run scored 1 items, the published figures all 921" in text and "gpt-4o-mini" in text
    rows = list(csv.DictReader(summary_csv([summary], TABLE_2).splitlines()))
    assert [r["kind"] for r in rows] == ["judged"] + ["published"] * len(TABLE_2)
    assert next(r for r in rows if r["model"] == "GPT-4-0613 (published)")["Average"] == "4.1"
    assert summary_png([summary], "t", TABLE_2)[:4] == b"\x89PNG"
    assert set(PICTURE_ROWS) <= {r.model for r in TABLE_2}
    assert comparability_notes(921, "gpt-4-0125-preview", 3) == []
    assert "(published)" not in summary_markdown([summary]), "no published rows on a bench of one's own"


# --- target counts and the accept list ------------------------------------------------------------

def test_target_counts_come_from_the_published_source_column(published_copy):
    counts = target_counts(str(published_copy))
    assert counts == {"alpaca_eval": 1, "flask": 1, "koala": 1, "mt_bench": 1, "self_instruct": 1}
    config = BenchConfig(sources=SOURCES, per_benchmark={**counts, "flask": 2})
    prompts, report = load_bench_prompts(config.sources, config.per_benchmark, seed=3)
    assert dict(report.drawn) == {"alpaca_eval": 1, "flask": 2, "koala": 1, "mt_bench": 1, "self_instruct": 1}
    with pytest.raises(ValueError, match="unknown benchmarks"):
        BenchConfig(per_benchmark={"flaks": 2})


def test_the_cli_reads_target_counts(published_copy):
    import argparse

    from facets.flows.commands import bench

    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["build", "--source", SOURCES[0], "--target-counts", str(published_copy)])
    assert bench.load_config(args).per_benchmark["koala"] == 1


def test_accepting_a_reviewed_bench_publishes_only_the_accepted_items(tmp_path, capsys):
    from facets.flows.cli import main
    from facets.schemas import BenchRow
    from facets.evaluation.bench_release import publish_bench

    rows = [BenchRow.model_validate({**r, "rubrics": r["rubrics"]}) for r in published_rows()[1:4]]
    store = Store(str(tmp_path / "data"))
    first = publish_bench(store, rows)
    review = tmp_path / "review.jsonl"
    assert main(["bench", "review", "--bench", first.path, "--out", str(review)]) == 0
    lines = [json.loads(line) for line in review.read_text().splitlines()]
    assert len(lines) == 3 and all({"item_id", "system", "prompt", "rubrics"} <= set(line) for line in lines)
    marked = [{**line, "accepted": k != 1} for k, line in enumerate(lines)]
    accept_file = tmp_path / "accepted.jsonl"
    accept_file.write_text("# reviewed\n" + "\n".join(json.dumps(m) for m in marked) + "\n")
    assert main(["bench", "accept", "--bench", first.path, "--accept", str(accept_file),
                 "--data-dir", str(tmp_path / "data")]) == 0
    assert "2 accepted items, 1 not accepted" in capsys.readouterr().out
    accepted = load_bench(str(tmp_path / "data"))
    assert {i.item_id for i in accepted.items} == {lines[0]["item_id"], lines[2]["item_id"]}
    assert accepted.version != first.version
    manifest = json.loads((Path(accepted.path).parent / "manifest.json").read_text())
    assert manifest["reviewed_from"] == first.version and manifest["not_accepted"] == 1
    (tmp_path / "typo.txt").write_text("not-an-item\n")
    assert main(["bench", "accept", "--bench", first.path, "--accept", str(tmp_path / "typo.txt"),
                 "--data-dir", str(tmp_path / "data")]) == 2
    assert "not items of" in capsys.readouterr().err


# --- the paper's inference settings at a server of our own ----------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RecordingServer:
    """An OpenAI-compatible server that records each body; `refuse_penalty` answers 400 to repetition_penalty
    as OpenAI does to a field it does not know."""

    def __init__(self, refuse_penalty: bool):
        self.refuse_penalty = refuse_penalty
        self.bodies: list[dict] = []

    async def __aenter__(self):
        from aiohttp import web

        async def answer(request):
            body = await request.json()
            self.bodies.append(body)
            if self.refuse_penalty and "repetition_penalty" in body:
                return web.json_response({"error": {"message": "Unrecognized request argument supplied: "
                                                               "repetition_penalty", "type": "invalid_request_error"}},
                                         status=400)
            usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
            if request.path.endswith("/completions") and "prompt" in body:
                choice = {"index": 0, "text": "It rains.", "finish_reason": "stop"}
            else:
                choice = {"index": 0, "message": {"role": "assistant", "content": "It rains."}, "finish_reason": "stop"}
            return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                      "choices": [choice], "usage": usage})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", answer)
        app.router.add_post("/v1/completions", answer)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = _free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc):
        await self.runner.cleanup()


def _bench() -> Bench:
    rubric = Rubric.model_validate({"criteria": "c?", "score_descriptions": {str(i): "d" for i in range(1, 6)}})
    items = tuple(BenchItem(f"i{k}", "koala", "koala", "You are terse.", f"Why does it rain {k}?", "r", (rubric,) * 4)
                  for k in range(3))
    return Bench("bench-test", "", items)


def _generate(tmp_path, refuse: bool, **spec_fields):
    from facets.evaluation.generate import generate

    async def main():
        async with RecordingServer(refuse) as server:
            spec = ModelSpec(name="janus", base_url=server.base_url, limits=RateLimits(rpm=60_000), **spec_fields)
            config = EvalConfig(data_dir=str(tmp_path / "data"), models=[spec])
            report = await generate(config, spec, _bench(), Store(config.data_dir), preflight=False)
            return report, server.bodies

    return asyncio.run(main())


def test_an_open_model_gets_the_papers_text_and_repetition_penalty(tmp_path):
    report, bodies = _generate(tmp_path, refuse=False, prompt_format="mistral")
    calls = [b for b in bodies if b.get("max_tokens") == 1024]
    assert report.made == 3 and report.repetition_penalty == 1.03 and not report.notes
    assert {b["prompt"] for b in calls} == {f"[INST] You are terse.\nWhy does it rain {k}? [/INST] " for k in range(3)}
    assert all(b["repetition_penalty"] == 1.03 and b["temperature"] == 1.0 and b["top_p"] == 0.9 for b in calls)
    # the no-system-message arm: the prompt alone, under its own label and fingerprint
    report, bodies = _generate(tmp_path, refuse=False, prompt_format="mistral", system_message=False)
    assert report.model == "janus (no system message)" and report.made == 3
    assert {b["prompt"] for b in bodies if b.get("max_tokens") == 1024} == {
        f"[INST] Why does it rain {k}? [/INST] " for k in range(3)}


def test_a_server_that_refuses_repetition_penalty_is_asked_without_it(tmp_path):
    report, bodies = _generate(tmp_path, refuse=True, prompt_format="chat")
    assert report.made == 3 and report.repetition_penalty is None
    assert "refused repetition_penalty" in report.notes[0]
    assert len(bodies) == 1 + 3, "one probe, then each item once"
    assert [b.get("repetition_penalty") for b in bodies] == [1.03, None, None, None]
    assert bodies[1]["messages"][0] == {"role": "system", "content": "You are terse."}


def test_an_openai_model_gets_no_repetition_penalty(tmp_path):
    report, bodies = _generate(tmp_path, refuse=True)
    assert report.made == 3 and len(bodies) == 3 and all("repetition_penalty" not in b for b in bodies)


# --- end to end: evaluate on the published copy ---------------------------------------------------

@pytest.mark.slow
def test_evaluate_on_the_published_copy_shows_table_2_beside_the_models(published_copy, tmp_path, prefect_server):
    from facets.flows.evaluate import evaluate
    from facets.schemas.config import EndpointConfig, Retries
    from facets.simulator.server import run_simulator

    retries = Retries(timeout_s=5, backoff_initial_s=0.05, backoff_max_s=0.5, max_attempts=6)
    with run_simulator(seed=3) as sim:
        models = [ModelSpec(name="facets-sim", label="sim", base_url=sim.base_url, limits=RateLimits(rpm=60_000),
                            retries=retries),
                  ModelSpec(name="facets-sim", label="sim-bare", base_url=sim.base_url, system_message=False,
                            prompt_format="mistral", limits=RateLimits(rpm=60_000), retries=retries)]
        judge = JudgeConfig(endpoint=EndpointConfig(base_url=sim.base_url, api_key="sk-test", model="facets-sim",
                                                    limits=RateLimits(rpm=60_000), retries=retries), runs=1)
        report = asyncio.run(evaluate(EvalConfig(bench=str(published_copy), data_dir=str(tmp_path / "data"),
                                                 models=models, judge=judge)))
    assert {label: g["made"] for label, g in report["generated"].items()} == {"sim": 5, "sim-bare": 5}
    assert [row["model"] for row in report["summary"]] == ["sim", "sim-bare"]
    assert all(row["coverage"] == 1.0 and row["total"] == 5 for row in report["summary"])
    assert len(report["published"]) == len(TABLE_2) and all(r["kind"] == "published" for r in report["published"])
    markdown = Path(report["outputs"]["markdown"]).read_text()
    assert "| Mistral 7B Instruct v0.2 (published) | 4.20 |" in markdown
    assert "this run scored 5 items" in markdown and "averages 1 judge run(s)" in markdown
    rows = list(csv.DictReader(Path(report["outputs"]["csv"]).open()))
    assert [r["kind"] for r in rows].count("published") == len(TABLE_2)
