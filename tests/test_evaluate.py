"""The Multifaceted Bench and the evaluate flow: bench construction from the five benchmarks' own files,
generation by models under test, LLM-judge scoring and the summary, against the loopback simulator over
HTTP with real Prefect flows, Parquet and `datasets`. Requests are counted at the simulator."""
from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facets.simulator.server import run_simulator
from facets.schemas import BenchRow, Instruction
from facets.schemas.config import EndpointConfig, RateLimits, Retries
from facets.schemas.evaluation import BENCHMARKS, BenchConfig, EvalConfig, Judgment, JudgeConfig, ModelSpec
from facets.storage import Store
from facets.evaluation.generate import endpoint_messages, mistral_prompt, render_local
from facets.evaluation.judge import (
    AVERAGE,
    judge_messages,
    judge_models,
    load_judge_template,
    parse_judgment,
    parse_score,
    summarise,
    summary_csv,
    summary_markdown,
)
from facets.evaluation.bench_release import BenchItem, load_bench
from facets.evaluation.sources import benchmark_of, load_bench_prompts

BENCH_DATA = Path(__file__).parent / "data" / "bench"
SOURCES = [f"{name}={BENCH_DATA / name}" for name in BENCHMARKS]
SIM_MODEL = "facets-sim"
RETRIES = Retries(timeout_s=5, backoff_initial_s=0.05, backoff_max_s=0.5, max_attempts=6)
# the sample: 3 per benchmark once shared prompts are kept by the most specific benchmark
SAMPLE_ITEMS = 15


def endpoint(url: str, model: str = SIM_MODEL) -> EndpointConfig:
    return EndpointConfig(base_url=url, api_key="sk-test", model=model, limits=RateLimits(rpm=60_000), retries=RETRIES)


# --- the score parser -----------------------------------------------------------------------------

@pytest.mark.parametrize("reply, score", [
    ("Feedback: The response follows the rubric closely and stays concise. [RESULT] 4", 4),
    ("[RESULT] 4", 4),
    ("Feedback: clear and on point.\n[RESULT]: 5", 5),
    ("Feedback: misses the novice framing.\n\n**[RESULT]** 2", 2),
    ("Feedback: partly tailored. [RESULT] (3)", 3),
    ("The answer ignores the preference for brevity.\nScore: 2", 2),
    ("Feedback: good.\n**Score:** 4/5", 4),
    ("Feedback: adequate. [RESULT] 3\n\nI hope this feedback helps you improve the response!", 3),
    ('Echoing "[RESULT] (an integer number between 1 and 5)" first. Feedback: thorough. [RESULT] 5', 5),
    ("Each response gets a score of 1 to 5. This one: Score: 3", 3),
    ("Feedback: the response is helpful, but I cannot decide on a number.", None),
    ("Feedback: ok [RESULT] 6", None),
    ("Feedback: ok [RESULT] 4.5", None),
    ("", None),
])
def test_score_parser_on_judge_output_shapes(reply, score):
    assert parse_score(reply) == score


def test_parse_judgment_keeps_the_feedback_and_refuses_a_reply_without_score():
    score, feedback = parse_judgment("Feedback: The response is concise and uses plain words. [RESULT] 4\n")
    assert (score, feedback) == (4, "The response is concise and uses plain words.")
    assert parse_judgment("###Feedback: fine.\nScore: 2")[1] == "fine."
    with pytest.raises(ValueError, match=r"\[RESULT\]"):
        parse_judgment("Feedback: a thoughtful answer without a number")


# --- averages -------------------------------------------------------------------------------------

def _item(item_id: str, benchmark: str) -> BenchItem:
    return BenchItem(item_id, benchmark, benchmark, "system", f"prompt {item_id}", "reference", ())


def _judgments(model: str, scores: dict[str, list[list[int]]]) -> list[Judgment]:
    return [Judgment(item_id=item, model=model, bench_version="b", benchmark="x", source="x", run=run, rubric_index=k,
                     score=score, feedback="f", judge_model="j", response_fingerprint="r", fingerprint=f"{item}{run}{k}")
            for item, runs in scores.items() for run, rubric_scores in enumerate(runs)
            for k, score in enumerate(rubric_scores)]


def test_averages_across_rubrics_and_runs_match_hand_computed_values():
    items = [_item("a1", "alpaca_eval"), _item("f1", "flask"), _item("f2", "flask"), _item("k1", "koala")]
    scores = {
        "a1": [[5, 4, 4, 3], [5, 5, 4, 4]],  # run means 4.0 and 4.5 -> 4.25
        "f1": [[1, 2, 3, 2], [2, 2, 2, 2]],  # 2.0 and 2.0 -> 2.0
        "f2": [[3, 3, 3, 3], [4, 4, 4, 4]],  # 3.0 and 4.0 -> 3.5
        "k1": [[5, 5, 5, 5], [4, 5, 5, 5]],  # 5.0 and 4.75 -> 4.875
    }
    partial = {**scores, "f2": [[3, 3, 3, 3], [4, 4, 4]]}  # one judge call of f2 failed
    [full, part] = summarise(items, {"full": _judgments("full", scores), "part": _judgments("part", partial)},
                             ["full", "part"], runs=2)
    assert full.cells["mf-AlpacaEval"].score == pytest.approx(4.25)
    assert full.cells["mf-FLASK"].score == pytest.approx((2.0 + 3.5) / 2)
    assert full.cells["mf-Koala"].score == pytest.approx(4.875)
    assert full.cells["mf-MT-Bench"].total == 0 and full.cells["mf-MT-Bench"].score is None
    # Average: over all items (the benchmarks weighted by size), not the mean of the columns
    assert full.cells[AVERAGE].score == pytest.approx((4.25 + 2.0 + 3.5 + 4.875) / 4)
    assert (full.coverage.scored, full.coverage.total) == (4, 4)
    # the failed item is left out of every average and counted, never averaged as if complete
    assert part.cells["mf-FLASK"].score == pytest.approx(2.0)
    assert (part.cells["mf-FLASK"].scored, part.cells["mf-FLASK"].total) == (1, 2)
    assert part.cells[AVERAGE].score == pytest.approx((4.25 + 2.0 + 4.875) / 3)
    assert (part.coverage.scored, part.coverage.total) == (3, 4)
    table = summary_markdown([full, part])
    assert table.splitlines()[0] == ("| Model | mf-AlpacaEval | mf-FLASK | mf-Koala | mf-MT-Bench | mf-Self-Instruct "
                                     "| Average | Coverage |")
    assert "| full | 4.25 | 2.75 | 4.88 | - | - | 3.66 | 4/4 (100.0%) |" in table
    assert "| part | 4.25 | 2.00 (1/2) | 4.88 | - | - | 3.71 (3/4) | 3/4 (75.0%) |" in table
    rows = list(csv.DictReader(io.StringIO(summary_csv([full, part]))))
    assert float(rows[0]["mf-FLASK"]) == pytest.approx(2.75) and rows[0]["mf-MT-Bench"] == ""
    assert (rows[1]["scored"], rows[1]["total"], rows[1]["coverage"]) == ("3", "4", "0.75")


def test_rubric_check_refuses_what_cannot_grade():
    from facets.schemas import Rubric
    from facets.evaluation.rubrics import check_rubric

    def rubric(criteria: str, descriptions: list[str]) -> Rubric:
        return Rubric.model_validate({"criteria": criteria, "score_descriptions": dict(zip("12345", descriptions))})

    good = [f"The response meets the preference at level {i}." for i in range(1, 6)]
    check_rubric(rubric("Does the response stay concise and jargon-free?", good))
    with pytest.raises(ValueError, match="criteria too short"):
        check_rubric(rubric("Concise?", good))
    with pytest.raises(ValueError, match="repeat"):
        check_rubric(rubric("Does the response stay concise and jargon-free?", ["Good."] * 5))
    with pytest.raises(ValueError, match="needs a description"):
        check_rubric(rubric("Does the response stay concise and jargon-free?", [*good[:4], "  "]))


# --- sources and prompt formats -------------------------------------------------------------------

def test_bench_sources_read_each_format_and_keep_a_shared_prompt_once():
    prompts, report = load_bench_prompts(SOURCES)
    assert dict(report.read) == {"alpaca_eval": 5, "flask": 4, "koala": 3, "mt_bench": 3, "self_instruct": 3}
    # AlpacaEval holds a Self-Instruct and a Koala prompt, FLASK a Koala one: the specific benchmark keeps them
    assert dict(report.duplicates) == {"alpaca_eval": 2, "flask": 1}
    assert len(prompts) == SAMPLE_ITEMS and len({p.id for p in prompts}) == SAMPLE_ITEMS
    by = {b: [p for p in prompts if p.benchmark == b] for b in BENCHMARKS}
    assert {p.source for p in by["flask"]} == {"Alpha-nlg (art)", "Gsm8k", "Bigbench: physics"}
    assert {p.source for p in by["mt_bench"]} == {"mt-bench"}
    assert all(benchmark_of(p.source) == p.benchmark for p in prompts)
    mt = [json.loads(line) for line in (BENCH_DATA / "mt_bench" / "question.jsonl").read_text().splitlines()]
    assert {p.text for p in by["mt_bench"]} == {q["turns"][0] for q in mt}, "MT-Bench: first turns only"
    joined = next(p.text for p in by["self_instruct"] if p.original_id == "user_oriented_task_0")
    assert joined.startswith("The sentence you are given might be too wordy") and "\n\nIf you have any questions" in joined
    again, _ = load_bench_prompts(SOURCES, per_benchmark=2, seed=1)
    assert len(again) == 10 and again == load_bench_prompts(SOURCES, per_benchmark=2, seed=1)[0]


def test_prompt_formats_for_endpoints():
    spec = ModelSpec(name="m")
    assert endpoint_messages(spec, "SYS", "Q") == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q"}]
    no_role = ModelSpec(name="m", prompt_format="chat", system_role=False)
    assert endpoint_messages(no_role, "SYS", "Q") == [{"role": "user", "content": "SYS\nQ"}]
    mistral = ModelSpec(name="m", prompt_format="mistral")
    # the paper's inference script: stripped inside, a space after [/INST]
    assert endpoint_messages(mistral, "SYS", "Q") == [{"role": "user", "content": "[INST] SYS\nQ [/INST] "}]
    assert mistral_prompt(" SYS", "Q\n") == "[INST] SYS\nQ [/INST] "
    # the no-system-message arm: the prompt alone, in every format
    for spec in (spec, no_role, mistral):
        bare = spec.model_copy(update={"system_message": False})
        assert [m["role"] for m in endpoint_messages(bare, "SYS", "Q")] == ["user"]
        assert "SYS" not in endpoint_messages(bare, "SYS", "Q")[0]["content"]
        assert bare.key == "m (no system message)"
    assert endpoint_messages(mistral.model_copy(update={"system_message": False}), "SYS", "Q")[0]["content"] == "[INST] Q [/INST] "
    with pytest.raises(ValueError):
        ModelSpec(name="m", local_model="/models/x", prompt_format="openai")


def _trained_tokenizer(chat_template: str):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.models.WordLevel(unk_token="<unk>")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tokenizer.train_from_iterator(["[INST] be brief\nwhat is rain [/INST] rain is water", "system user assistant"], trainer)
    bos = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>", chat_template=chat_template)


CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# Mistral-Instruct's template: no system role, it raises
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
                    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
                    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def test_local_prompt_formats_with_a_tokenizer_trained_on_the_fly():
    chat = ModelSpec(name="m", local_model="/models/m", prompt_format="chat")
    with_role = _trained_tokenizer(CHATML)
    text, special = render_local(with_role, chat, "be brief", "what is rain")
    assert text == "<|system|>\nbe brief\n<|user|>\nwhat is rain\n<|assistant|>\n" and special is False
    without_role = _trained_tokenizer(MISTRAL_TEMPLATE)
    chat_text, special = render_local(without_role, chat, "be brief", "what is rain")
    assert chat_text == "<s>[INST] be brief\nwhat is rain [/INST]", "the system message goes before the user turn"
    chat_ids = without_role(chat_text, add_special_tokens=special)["input_ids"]
    mistral = ModelSpec(name="m", local_model="/models/m", prompt_format="mistral")
    text, special = render_local(without_role, mistral, "be brief", "what is rain")
    assert (text, special) == ("[INST] be brief\nwhat is rain [/INST] ", True)
    ids = without_role(text, add_special_tokens=special)["input_ids"]
    # exactly one BOS either way: the raw format gets it from the tokenizer, the template writes its own
    assert ids == chat_ids and ids.count(without_role.bos_token_id) == 1 and ids[0] == without_role.bos_token_id


def test_a_local_model_generates_in_batches_and_journals(tmp_path):
    """A tiny randomly initialised causal LM stands in for a local model (only where torch is installed)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from facets.schemas.config import Sampling
    from facets.evaluation.generate import LocalModel, generate_local
    from facets.evaluation.judge import latest_responses
    from facets.evaluation.bench_release import Bench

    tokenizer = _trained_tokenizer(CHATML)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    transformers.LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    items = tuple(BenchItem(f"i{k}", "koala", "koala", "be brief", f"what is rain {k}", "rain is water", ()) for k in range(3))
    bench = Bench("bench-test", str(tmp_path), items)
    spec = ModelSpec(name="tiny", local_model=str(model_dir), prompt_format="chat", batch_size=2)
    run = EvalConfig(data_dir=str(tmp_path / "data"), generation=Sampling(max_tokens=6))
    store = Store(run.data_dir)
    report = generate_local(run, spec, bench, store)
    assert (report.made, report.failed) == (3, 0)
    rows = latest_responses(store, "bench-test")["tiny"]
    assert sorted(rows) == ["i0", "i1", "i2"] and all(r.completion_tokens <= 6 for r in rows.values())
    # stored rows are found: nothing is loaded or generated again
    assert generate_local(run, spec, bench, store, load=lambda path: pytest.fail("loaded again")).reused == 3

    class Refuses(LocalModel):
        def __init__(self, path):
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)

        def generate(self, *args):
            raise AssertionError("generated again")

    # with the rows gone, the journal answers
    again = generate_local(run, spec, bench, Store(str(tmp_path / "other")), load=Refuses)
    assert again.made == 3


def test_the_judge_sees_instruction_response_reference_and_one_rubric_but_not_the_system_message():
    from facets.schemas import Rubric

    rubric = Rubric.model_validate({"criteria": "Is it brief?", "score_descriptions": {str(i): f"level {i}" for i in range(1, 6)}})
    item = BenchItem("i", "koala", "koala", "SECRET SYSTEM MESSAGE", "What is rain?", "Rain is water.", (rubric,) * 4)
    messages = judge_messages(load_judge_template(), item, "It is wet.", rubric)
    text = "\n".join(m["content"] for m in messages)
    assert "SECRET SYSTEM MESSAGE" not in text
    for part in ("What is rain?", "It is wet.", "Rain is water.", '"criteria": "Is it brief?"', '"5": "level 5"', "[RESULT]"):
        assert part in text
    assert messages[1]["content"].index("What is rain?") < messages[1]["content"].index("It is wet.") \
        < messages[1]["content"].index("Rain is water.") < messages[1]["content"].index("Is it brief?")


# --- the simulator's judge and completions replies ------------------------------------------------

def _post(url: str, path: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_simulator_ends_a_judge_reply_with_a_score_and_serves_raw_completions():
    judge = {"model": SIM_MODEL, "messages": [{"role": "user", "content": "Grade it. Format: Feedback: ... [RESULT] (1-5)"}],
             "seed": 1}
    with run_simulator(seed=5) as sim:
        first = _post(sim.base_url, "/chat/completions", judge)["choices"][0]["message"]["content"]
        again = _post(sim.base_url, "/chat/completions", judge)["choices"][0]["message"]["content"]
        plain = _post(sim.base_url, "/chat/completions", {"model": SIM_MODEL, "messages": [{"role": "user", "content": "Hi"}]})
        raw = _post(sim.base_url, "/completions", {"model": SIM_MODEL, "prompt": "[INST] be kind\nhello [/INST]", "max_tokens": 50})
    assert first == again and first.startswith("Feedback: ") and parse_score(first) in {1, 2, 3, 4, 5}
    assert "[RESULT]" not in plain["choices"][0]["message"]["content"]
    assert raw["object"] == "text_completion" and raw["choices"][0]["text"] and raw["usage"]["completion_tokens"] <= 50
    with run_simulator(seed=5, faults={"off_spec": 1.0}) as sim:
        off = _post(sim.base_url, "/chat/completions", judge)["choices"][0]["message"]["content"]
    assert parse_score(off) is None, "an off-spec judge reply has no score: the judge asks again"


# --- end to end -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    with run_simulator(seed=7) as server:
        yield server


@pytest.fixture(scope="module")
def built(prefect_server, sim, tmp_path_factory):
    """A bench built from the sample of the five benchmarks, with one training prompt among them."""
    from facets.flows.evaluate import build_bench

    data = tmp_path_factory.mktemp("bench-data")
    prompts, _ = load_bench_prompts(SOURCES)
    trained = next(p for p in prompts if p.benchmark == "koala")
    Store(str(data)).write("instructions", [Instruction.from_text("  " + trained.text.upper().lower() + " ", "nectar")])
    config = BenchConfig(sources=SOURCES, data_dir=str(data), endpoint=endpoint(sim.base_url), shard_size=4)
    before = sim.stats()["requests"]
    report = asyncio.run(build_bench(config))
    return {"data": data, "config": config, "report": report, "trained": trained,
            "requests": sim.stats()["requests"] - before}


def test_bench_build_gives_the_published_layout_without_training_prompts(built, sim):
    import datasets

    report, data = built["report"], built["data"]
    assert [c["prompt"] for c in report["contaminated"]] == [built["trained"].text]
    items = sum(report["built"].values())
    assert items + sum(report["left_out"].values()) == SAMPLE_ITEMS - 1
    assert items >= SAMPLE_ITEMS - 4, report["left_out"]
    release = Path(report["release"]["path"])
    assert release.parent.joinpath("LATEST_BENCH").read_text().strip() == release.name
    assert not (release.parent / "LATEST").exists(), "the training release pointer is left alone"
    bench = datasets.load_dataset("parquet", data_dir=str(release / "bench"), split="train", cache_dir=str(data / "hf"))
    assert bench.column_names == ["source", "preference_set", "system", "prompt", "reference_answer", "rubrics"]
    assert len(bench) == items
    assert list(bench.features["rubrics"].feature["score_descriptions"]) == ["1", "2", "3", "4", "5"]
    labels = {"alpaca-eval", "koala", "mt-bench", "self-instruct", "Alpha-nlg (art)", "Gsm8k", "Bigbench: physics"}
    for row in bench:
        BenchRow.model_validate(row)
        assert row["source"] in labels
        assert [p["dimension"] for p in row["preference_set"]] == ["style", "background_knowledge", "informativeness",
                                                                   "harmlessness"]
        assert len(row["rubrics"]) == 4 and all(r["criteria"] for r in row["rubrics"])
        assert row["prompt"] != built["trained"].text
    # the bench's stages are the build's: trees, one set per item, system messages, references, plus rubrics
    store = Store(str(data))
    assert store.count("responses") >= items and store.count("bench_rubrics") >= 4 * items
    assert {r["set_index"] for r in store.read("preference_sets").to_pylist()} == {0}
    assert {r["set_index"] for r in store.read("responses").to_pylist()} == {0}
    # a second build asks nothing and publishes nothing new
    from facets.flows.evaluate import build_bench

    before = sim.stats()["requests"]
    again = asyncio.run(build_bench(built["config"]))
    retried = sum(again["stages"][s]["made"] + again["stages"][s]["failed"] for s in again["stages"])
    assert sim.stats()["requests"] - before <= 3 * retried
    if not sum(again["stages"][s]["made"] for s in again["stages"]):  # a failed call asked again may come good
        assert again["release"]["version"] == report["release"]["version"] and not again["release"]["is_new"]


def _eval_config(built, sim_url: str, judge_url: str | None = None, **overrides) -> EvalConfig:
    models = [ModelSpec(name=SIM_MODEL, label="sim-openai", base_url=sim_url, limits=RateLimits(rpm=60_000), retries=RETRIES),
              ModelSpec(name=SIM_MODEL, label="sim-mistral", base_url=sim_url, prompt_format="mistral",
                        limits=RateLimits(rpm=60_000), retries=RETRIES)]
    values = dict(bench=str(built["data"]), data_dir=str(built["data"]), models=models,
                  judge=JudgeConfig(endpoint=endpoint(judge_url or sim_url)))
    return EvalConfig(**{**values, **overrides})


def test_evaluate_generates_judges_and_summarises_two_models(built, sim):
    from facets.flows.evaluate import evaluate

    bench = load_bench(str(built["data"]))
    n = len(bench.items)
    before = sim.stats()["requests"]
    report = asyncio.run(evaluate(_eval_config(built, sim.base_url)))
    paid = sim.stats()["requests"] - before
    assert {label: (g["made"], g["failed"]) for label, g in report["generated"].items()} == {
        "sim-openai": (n, 0), "sim-mistral": (n, 0)}
    assert report["judged"]["judged"] == 2 * n * 3 * 4 and report["judged"]["failed"] == 0
    # + 1: the one-token probe of whether the open model's server takes repetition_penalty
    assert paid == 2 * n + 2 * n * 3 * 4 + 1, "one call per response and per (run, rubric): nothing asked again"
    assert [row["model"] for row in report["summary"]] == ["sim-openai", "sim-mistral"]
    for row in report["summary"]:
        assert row["coverage"] == 1.0 and 1 <= row[AVERAGE] <= 5
        present = {BENCHMARKS[i.benchmark] for i in bench.items}
        assert all((row[c] is not None) == (c in present) for c in BENCHMARKS.values())
    outputs = {k: Path(v) for k, v in report["outputs"].items()}
    assert outputs["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outputs["markdown"].read_text().count("| sim-") == 2
    assert next(csv.DictReader(outputs["csv"].open()))["model"] == "sim-openai"
    scores = pq.read_table(outputs["scores"]).to_pylist()
    assert len(scores) == 2 * n and all(s["status"] == "scored" for s in scores)
    store = Store(str(built["data"]))
    responses = pq.read_table(store.path("evals", bench.version, "responses")).to_pylist()
    assert {r["prompt_format"] for r in responses} == {"openai", "mistral"}
    judgments = pq.read_table(store.path("evals", bench.version, "judgments")).to_pylist()
    assert all(1 <= j["score"] <= 5 and j["feedback"] for j in judgments)
    # a rerun pays for nothing: responses and judgments are found by fingerprint
    before = sim.stats()["requests"]
    again = asyncio.run(evaluate(_eval_config(built, sim.base_url)))
    assert sim.stats()["requests"] == before
    assert again["summary"] == report["summary"]


def test_a_model_with_a_failed_item_is_reported_with_its_coverage(built, sim):
    from facets.evaluation.generate import generate

    bench = load_bench(str(built["data"]))
    n = len(bench.items)
    store = Store(str(built["data"]))
    spec = ModelSpec(name=SIM_MODEL, label="flaky", base_url=sim.base_url, limits=RateLimits(rpm=60_000), retries=RETRIES)
    config = _eval_config(built, sim.base_url, models=[spec])
    asyncio.run(generate(config, spec, bench, store))
    # every item but the last is judged by a healthy judge
    asyncio.run(judge_models(config.model_copy(update={"limit": n - 1}), bench, ["flaky"], store))
    # the last item meets a judge whose every reply lacks its score: asked again 5 times, then a failure
    with run_simulator(seed=7, faults={"off_spec": 1.0}) as broken:
        report = asyncio.run(judge_models(_eval_config(built, sim.base_url, broken.base_url, models=[spec]),
                                          bench, ["flaky"], store))
        asked = broken.stats()["requests"]
    assert asked == 3 * 4 * (1 + 5)
    assert report.failed == 3 * 4 and report.reused == (n - 1) * 3 * 4
    [summary] = report.summary
    assert (summary.coverage.scored, summary.coverage.total) == (n - 1, n)
    last = BENCHMARKS[bench.items[-1].benchmark]
    assert summary.cells[last].scored == summary.cells[last].total - 1
    table = Path(report.outputs["markdown"]).read_text()
    assert f"{n - 1}/{n} (" in table and "failed" in table
    scores = {s["item_id"]: s for s in pq.read_table(report.outputs["scores"]).to_pylist()}
    assert scores[bench.items[-1].item_id]["status"] == "judge failed"
    assert scores[bench.items[-1].item_id]["score"] is None
    failures = store.read("failures").to_pylist()
    assert sum(1 for f in failures if f["stage"] == "judge" and f["key"].startswith(f"flaky#{bench.items[-1].item_id}")) == 12


def test_judge_in_batch_mode_pays_one_batch_and_stores_the_same_judgments(built, sim):
    from facets.evaluation.generate import generate

    bench = load_bench(str(built["data"]))
    store = Store(str(built["data"]))
    # its own prompt format: responses, hence judge prompts, that no other test has paid for
    spec = ModelSpec(name=SIM_MODEL, label="batched", base_url=sim.base_url, prompt_format="chat", system_role=False,
                     limits=RateLimits(rpm=60_000), retries=RETRIES)
    judge = JudgeConfig(endpoint=endpoint(sim.base_url), mode="batch", runs=1, batch_poll_s=0.2)
    config = _eval_config(built, sim.base_url, models=[spec], judge=judge, limit=2)
    asyncio.run(generate(config, spec, bench, store))
    before = sim.stats()["batch"]
    report = asyncio.run(judge_models(config, bench, ["batched"], store))
    after = sim.stats()["batch"]
    assert (after["batches"] - before["batches"], after["lines"] - before["lines"]) == (1, 2 * 4)
    assert (report.judged, report.failed) == (8, 0)
    assert report.summary[0].coverage.scored == 2
    again = asyncio.run(judge_models(config.model_copy(update={"judge": judge.model_copy(update={"mode": "online"})}),
                                     bench, ["batched"], store))
    assert (again.judged, again.reused) == (0, 8), "the batch's judgments are found by fingerprint"


def test_training_prompts_come_from_the_instructions_stage_and_every_release(tmp_path):
    import pyarrow as pa

    from facets.evaluation.bench_release import split_contaminated, training_prompts

    store = Store(str(tmp_path))
    store.write("instructions", [Instruction.from_text("Name three  colours.", "nectar")])
    (tmp_path / "releases" / "0123" / "sft").mkdir(parents=True)
    pq.write_table(pa.table({"prompt": ["What is  RAIN?"]}), tmp_path / "releases" / "0123" / "sft" / "train-00000-of-00001.parquet")
    prompts, _ = load_bench_prompts(SOURCES)
    from facets.evaluation.sources import BenchPrompt

    extra = [BenchPrompt("koala", "koala", "name three colours.", "x"), BenchPrompt("koala", "koala", "What is rain?", "y")]
    kept, removed = split_contaminated(prompts + extra, training_prompts(store))
    assert [p.original_id for p in removed] == ["x", "y"] and len(kept) == len(prompts)


def test_eval_cli_judges_stored_responses(built, sim, capsys):
    from facets.flows.cli import main

    code = main(["eval", "run", "--data-dir", str(built["data"]), "--model", SIM_MODEL, "--label", "sim-openai",
                 "--base-url", sim.base_url, "--rpm", "60000", "--judge-base-url", sim.base_url,
                 "--judge-model", SIM_MODEL, "--judge-rpm", "60000"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| sim-openai |" in out and "summary.png" in out
