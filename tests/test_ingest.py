"""Ingestion of the five instruction sources and of a user's own: mapping, rules, dedup, selection, bad input.

The paper's sources are read from real records in tests/data/sources; bad input is built in tmp_path. The
CLI is driven through `facets.flows.cli.main` (the console script's entry point) and, where the process
boundary matters (no traceback, exit status), through a real `python -m facets.flows.cli` subprocess.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facets.flows.cli import main
from facets.schemas import Instruction, from_table, instruction_id
from facets.storage import Catalog, Store
from facets.ingest import filters
from facets.ingest.pool import IngestError, ingest
from facets.ingest.sources import HubDataset, Source, SourceError, parse_source

FIXTURES = Path(__file__).parent / "data" / "sources"
NECTAR = FIXTURES / "nectar" / "data.jsonl"
OPENHERMES = FIXTURES / "openhermes" / "train.parquet"
ULTRAFEEDBACK = FIXTURES / "ultrafeedback" / "train_prefs.jsonl"
CHATBOT_ARENA = FIXTURES / "chatbot_arena" / "train.parquet"
DSP = FIXTURES / "dsp"  # a directory: its JSON array is read, DATA_LICENSE is not
PAPER_SOURCES = [
    f"nectar={NECTAR}",
    f"openhermes={OPENHERMES}",
    f"ultrafeedback={ULTRAFEEDBACK}",
    f"chatbot_arena={CHATBOT_ARENA}",
    f"dsp={DSP}",
]
ROOT = Path(__file__).resolve().parent.parent


# -- helpers ---------------------------------------------------------------------------------------------
def instructions(data_dir: Path) -> list[dict]:
    return sorted(Store(data_dir).read("instructions").to_pylist(), key=lambda r: r["id"])


def by_text(data_dir: Path) -> dict[str, dict]:
    return {row["text"]: row for row in instructions(data_dir)}


def failures(data_dir: Path) -> list[dict]:
    with Catalog(Store(data_dir)) as catalog:
        return catalog.sql("SELECT stage, key, reason, detail, source, row, raw_output FROM failures "
                           "ORDER BY key, row").to_arrow_table().to_pylist()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["ingest", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def summary_rows(out: str) -> dict[str, dict[str, int]]:
    """The printed kept/dropped table as {source: {column: count}}."""
    lines = [line.split() for line in out.splitlines()]
    header_at = next(i for i, line in enumerate(lines) if line[:3] == ["source", "read", "kept"])
    header = lines[header_at]
    table = {}
    for line in lines[header_at + 1:]:
        if len(line) != len(header):
            break
        table[line[0]] = {column: int(value) for column, value in zip(header[1:], line[1:])}
    return table


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("facets ingest: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory) -> tuple[Path, object]:
    """All five real sources ingested once; tests that only read share it."""
    data_dir = tmp_path_factory.mktemp("paper")
    return data_dir, ingest(data_dir, PAPER_SOURCES)


# -- per-source mapping on the real records ---------------------------------------------------------------
def _raw_nectar(prefix: str) -> dict:
    return next(r for r in map(json.loads, NECTAR.read_text().splitlines()) if r["prompt"].startswith(prefix))


def test_nectar_strips_the_hh_framing_and_keeps_the_upstream_tag(paper_run):
    data_dir, _ = paper_run
    raw = _raw_nectar("\n\nHuman: Write a detailed character study")
    expected = raw["prompt"].removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant: ").strip()
    row = by_text(data_dir)[expected]
    assert row["main_source"] == "Nectar"
    assert row["original_source"] == raw["source"][0] == "ultrachat"
    assert "Human:" not in row["text"] and "Assistant:" not in row["text"]
    assert row["id"] == instruction_id(expected)


def test_openhermes_maps_prompt_and_source(paper_run):
    row = by_text(paper_run[0])["Suggest an interesting sentence that uses alliteration."]
    assert (row["main_source"], row["original_source"]) == ("OpenHermesPreferences", "CamelAI")


def test_ultrafeedback_maps_prompt_and_source(paper_run):
    row = by_text(paper_run[0])["Of what elements is Helium composed?"]
    assert (row["main_source"], row["original_source"]) == ("ultrafeedback_binarized_cleaned", "ultrachat")


def test_chatbot_arena_takes_the_first_user_turn(paper_run):
    row = by_text(paper_run[0])["Describe a different way to serve a pancake."]
    assert (row["main_source"], row["original_source"]) == ("chatbot_arena_conversations", "chatbot_arena")


def test_dsp_maps_query_from_a_json_array_in_a_directory(paper_run):
    row = by_text(paper_run[0])["Name three methods to reduce greenhouse gas emissions."]
    assert (row["main_source"], row["original_source"]) == ("domain_specific_preference", "alpaca")


def test_every_written_row_is_a_valid_instruction(paper_run):
    data_dir, summary = paper_run
    table = Store(data_dir).read("instructions")
    assert table.num_rows == summary.kept == 233
    rows = from_table(table, Instruction)  # validates id == hash of text, bucket range, non-empty text
    assert len({r.id for r in rows}) == len(rows)
    assert all(r.text == r.text.strip() for r in rows)


def test_summary_counts_every_row_of_every_source(paper_run):
    _, summary = paper_run
    assert {name: t.read for name, t in summary.tallies.items()} == {
        "nectar": 100, "openhermes": 11, "ultrafeedback": 13, "chatbot_arena": 11, "dsp": 150}


# -- the paper's rules --------------------------------------------------------------------------------------
def test_multi_turn_rows_are_dropped(paper_run):
    data_dir, summary = paper_run
    multi = [r for r in map(json.loads, NECTAR.read_text().splitlines()) if r["turns"] > 1]
    assert summary.tallies["nectar"].dropped["multi_turn"] == len(multi) == 24
    texts = by_text(data_dir)
    assert not any(t.startswith("How many time zones are there?") for t in texts)  # a 4-turn Nectar row
    assert "Can you describe what light therapy can help with?" not in texts  # 2 user turns in `chosen`
    assert not any(t.startswith("We should just let Trump") for t in texts)  # Chatbot Arena turn == 2
    assert summary.tallies["openhermes"].dropped["multi_turn"] == 1
    assert summary.tallies["chatbot_arena"].dropped["multi_turn"] == 1


def test_non_english_is_dropped_where_the_source_records_a_language(paper_run, tmp_path):
    data_dir, summary = paper_run
    assert summary.tallies["chatbot_arena"].dropped["not_english"] == 1
    assert not any(t.startswith("Lucie est à la maison") for t in by_text(data_dir))
    # a user's source: a `language` column is honoured; rows without one are kept
    own = write_jsonl(tmp_path / "own.jsonl", [
        {"prompt": "Bonjour, comment ça va ?", "language": "French"},
        {"prompt": "Say hello in French.", "language": "English"},
        {"prompt": "Say hello in German.", "language": "en-GB"},
        {"prompt": "Say hello in Dutch.", "language": "fr"},
        {"prompt": "Say hello in Spanish."},
    ])
    result = ingest(tmp_path / "data", [f"mine={own}"])
    assert result.tallies["mine"].dropped["not_english"] == 2
    assert set(by_text(tmp_path / "data")) == {"Say hello in French.", "Say hello in German.", "Say hello in Spanish."}


def test_language_rule_unit():
    assert filters.not_english(None) is None and filters.not_english("") is None
    assert filters.not_english("English") is None and filters.not_english("en_US") is None
    assert filters.not_english("Spanish") == "not_english" and filters.not_english("enx") == "not_english"


def test_empty_text_is_dropped(paper_run, tmp_path):
    assert paper_run[1].tallies["ultrafeedback"].dropped["empty"] == 1  # the real record with prompt ""
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": ""}, {"prompt": " \n\t "}, {"prompt": "Fine."}])
    result = ingest(tmp_path / "data", [f"mine={own}"])
    assert result.tallies["mine"].dropped["empty"] == 2 and result.kept == 1


def test_over_long_text_is_dropped_at_8000_by_default_and_at_max_chars(paper_run, tmp_path):
    assert paper_run[1].tallies["openhermes"].dropped["too_long"] == 1  # the 12,630-character article
    at_limit, over = "a" * (filters.DEFAULT_MAX_CHARS - 1) + ".", "b" * filters.DEFAULT_MAX_CHARS + "."
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": at_limit}, {"prompt": over}, {"prompt": "  Short one. \n"}])
    result = ingest(tmp_path / "default", [f"mine={own}"])
    assert result.tallies["mine"].dropped["too_long"] == 1
    assert set(by_text(tmp_path / "default")) == {at_limit, "Short one."}  # surrounding space does not count
    result = ingest(tmp_path / "short", [f"mine={own}"], max_chars=10)
    assert result.tallies["mine"].dropped["too_long"] == 2
    assert set(by_text(tmp_path / "short")) == {"Short one."}


def test_max_chars_through_the_cli(capsys, tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", [{"prompt": "x" * 50}, {"prompt": "y" * 51}])
    rc, out, _ = cli(capsys, "--source", f"mine={own}", "--data-dir", str(tmp_path / "data"), "--max-chars", "50")
    assert rc == 0
    assert summary_rows(out)["mine"] == {"read": 2, "kept": 1, "too_long": 1}


ROLE_PLAY_DROPPED = [
    "You are a helpful travel agent. Plan a trip to Rome.",
    "you are an expert chef",
    "YOU ARE a pirate, talk like one",
    "You're a detective. Solve this case.",
    "You\u2019re my tutor for today.",  # curly apostrophe
    "Imagine you are on a mission to Mars and write a diary entry.",
    "imagine a world without electricity",
    "Please IMAGINE the year 3000.",
    "Take on the role of a customer support agent.",
    "take the role of the villain",
    "I want you to take up the role of a coach and motivate me.",
    "   \n  You are a poet.\nWrite about rain.",  # leading blank lines do not hide the first line
]
ROLE_PLAY_KEPT = [
    "Youth unemployment is rising; explain why.",
    "I imagined a blue elephant. Describe it.",
    "Imagination is more important than knowledge: discuss.",
    "Your answer should be short. What is 2 + 2?",
    "You aren't ready? Explain why.",  # "you aren't" is not "you are"
    "Bayou areas flood often; why?",
    "The role of mitochondria in a cell.",
    "Summarise the text below.\nYou are free to use bullet points.",  # a preamble on a later line
    "Take a break and describe rainforests.",  # "take" with no "role" on the line
    "She takes on the role of a nurse in the play. Who wrote it?",  # "takes", not "take"
    "Name the mistake.",
]


@pytest.mark.parametrize("text", ROLE_PLAY_DROPPED)
def test_role_play_preamble_is_dropped(text):
    assert filters.role_play(text) == "role_play"
    assert filters.drop_reason(text) == "role_play"


@pytest.mark.parametrize("text", ROLE_PLAY_KEPT)
def test_role_play_negatives_are_kept(text):
    assert filters.role_play(text) is None
    assert filters.drop_reason(text) is None


def test_role_play_rule_on_the_real_records(paper_run):
    data_dir, summary = paper_run
    texts = by_text(data_dir)
    assert "Imagine you are on a mission to Mars and write a diary entry about the experience." not in texts
    assert not any(t.startswith("Imagine a story set in an underwater world") for t in texts)
    assert summary.tallies["dsp"].dropped["role_play"] == 2  # "Suppose you are ...", "Imagine you are ..."
    assert sum(t.dropped["role_play"] for t in summary.tallies.values()) == 15


def test_rules_apply_in_a_fixed_order():
    assert filters.drop_reason("You are a bot", user_turns=2, language="French") == "multi_turn"
    assert filters.drop_reason("You are a bot", language="French") == "not_english"
    assert filters.drop_reason("", language="English") == "empty"
    assert filters.drop_reason("You are " + "x" * 20, max_chars=10) == "too_long"


# -- dedup across sources -------------------------------------------------------------------------------------
def test_duplicates_are_removed_on_normalised_text_with_source_priority(paper_run):
    data_dir, summary = paper_run
    texts = by_text(data_dir)
    # within UltraFeedback: a copy with doubled spaces and a trailing newline is the same instruction
    assert summary.tallies["ultrafeedback"].dropped["duplicate"] == 3
    baroque = texts["List some famous artists from the Baroque period."]
    assert baroque["main_source"] == "ultrafeedback_binarized_cleaned"
    # across sources: the earlier source in the paper's order keeps the shared instruction
    shared = next(t for t in texts if t.startswith("Create a list of interview questions"))
    assert texts[shared]["main_source"] == "OpenHermesPreferences"  # also in UltraFeedback
    character_study = next(t for t in texts if t.startswith("Write a detailed character study"))
    assert texts[character_study]["main_source"] == "Nectar"  # also in UltraFeedback
    assert summary.tallies["chatbot_arena"].dropped["duplicate"] == 2
    assert summary.tallies["dsp"].dropped["duplicate"] == 3


def test_dedup_is_the_same_whatever_the_order_of_the_flags(paper_run, tmp_path):
    data_dir, _ = paper_run
    ingest(tmp_path / "reversed", list(reversed(PAPER_SOURCES)))
    keep = ("id", "text", "main_source", "original_source", "bucket")
    first = [{k: r[k] for k in keep} for r in instructions(data_dir)]
    second = [{k: r[k] for k in keep} for r in instructions(tmp_path / "reversed")]
    assert first == second


def test_user_sources_rank_after_the_paper_sources_then_by_name(tmp_path):
    shared = "Name three methods to reduce greenhouse gas emissions."  # also a DSP record
    zeta = write_jsonl(tmp_path / "zeta.jsonl", [{"prompt": shared}, {"prompt": "Only in both mine."}])
    alpha = write_jsonl(tmp_path / "alpha.jsonl", [{"prompt": "Only  in both mine. "}])
    summary = ingest(tmp_path / "data", [f"zeta={zeta}", f"alpha={alpha}", f"dsp={DSP}"])
    texts = by_text(tmp_path / "data")
    assert texts[shared]["main_source"] == "domain_specific_preference"
    assert texts["Only  in both mine."]["main_source"] == "alpha"  # the text as the kept row has it, stripped
    assert summary.tallies["zeta"].dropped["duplicate"] == 2
    assert list(summary.tallies) == ["dsp", "alpha", "zeta"]


# -- --limit and --quota -----------------------------------------------------------------------------------
def _ids(data_dir: Path) -> set[str]:
    return {r["id"] for r in instructions(data_dir)}


def test_limit_is_deterministic_under_a_seed_and_grows_as_a_superset(tmp_path):
    runs = {}
    for name, limit, seed in [("a", 40, 7), ("b", 40, 7), ("c", 40, 8), ("big", 90, 7)]:
        summary = ingest(tmp_path / name, PAPER_SOURCES, limit=limit, seed=seed)
        assert summary.kept == limit
        runs[name] = _ids(tmp_path / name)
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]
    assert runs["a"] < runs["big"]


def test_limit_does_not_depend_on_row_order(tmp_path):
    records = json.loads((DSP / "domain_specific_preference.json").read_text())
    forward = tmp_path / "forward.json"
    forward.write_text(json.dumps(records))
    backward = tmp_path / "backward.json"
    backward.write_text(json.dumps(records[::-1]))
    ingest(tmp_path / "f", [f"dsp={forward}"], limit=25, seed=3)
    ingest(tmp_path / "b", [f"dsp={backward}"], limit=25, seed=3)
    assert _ids(tmp_path / "f") == _ids(tmp_path / "b")


def test_quota_caps_one_source_deterministically(tmp_path):
    small = ingest(tmp_path / "q10", PAPER_SOURCES, quotas={"dsp": 10}, seed=1)
    again = ingest(tmp_path / "q10b", PAPER_SOURCES, quotas={"dsp": 10}, seed=1)
    large = ingest(tmp_path / "q30", PAPER_SOURCES, quotas={"dsp": 30}, seed=1)
    assert small.tallies["dsp"].kept == 10 and large.tallies["dsp"].kept == 30
    assert small.tallies["dsp"].dropped["over_quota"] == 145 - 10
    assert small.tallies["nectar"].kept == 66  # other sources untouched
    dsp_ids = lambda d: {r["id"] for r in instructions(d) if r["main_source"] == "domain_specific_preference"}
    assert dsp_ids(tmp_path / "q10") == dsp_ids(tmp_path / "q10b")
    assert dsp_ids(tmp_path / "q10") < dsp_ids(tmp_path / "q30")
    assert again.kept == small.kept


def test_quota_and_limit_together(tmp_path):
    summary = ingest(tmp_path / "data", PAPER_SOURCES, quotas={"dsp": 5, "nectar": 5}, limit=12, seed=0)
    assert summary.kept == 12
    assert summary.tallies["dsp"].kept <= 5 and summary.tallies["nectar"].kept <= 5
    dropped = sum(t.dropped["over_limit"] for t in summary.tallies.values())
    assert dropped == 5 + 5 + 8 + 8 + 6 - 12


def test_limit_and_quota_through_the_cli(capsys, tmp_path):
    args = ["--data-dir", str(tmp_path / "data"), "--limit", "20", "--seed", "4", "--quota", "nectar=3"]
    rc, out, err = cli(capsys, *[a for s in PAPER_SOURCES for a in ("--source", s)], *args)
    assert rc == 0, err
    table = summary_rows(out)
    assert table["total"]["kept"] == 20
    assert table["nectar"]["kept"] <= 3 and table["nectar"]["over_quota"] == 66 - 3


def test_bad_limit_and_quota_options(capsys, tmp_path):
    source = f"dsp={DSP}"
    data = str(tmp_path / "data")
    rc, _, err = cli(capsys, "--source", source, "--data-dir", data, "--quota", "nectar=3")
    assert_one_line_error(rc, err, "--quota nectar=3", "no source named nectar")
    rc, _, err = cli(capsys, "--source", source, "--data-dir", data, "--limit", "-1")
    assert_one_line_error(rc, err, "--limit")
    rc, _, err = cli(capsys, "--source", source, "--data-dir", data, "--workers", "0")
    assert_one_line_error(rc, err, "--workers")
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, "--source", source, "--data-dir", data, "--quota", "dsp")
    assert exit_.value.code != 0
    assert not (tmp_path / "data").exists()


# -- reruns --------------------------------------------------------------------------------------------------
def test_rerun_adds_nothing(tmp_path):
    first = ingest(tmp_path / "data", PAPER_SOURCES)
    files = Store(tmp_path / "data").files("instructions")
    second = ingest(tmp_path / "data", PAPER_SOURCES)
    assert second.kept == 0 and second.files == []
    assert sum(t.dropped["already_ingested"] for t in second.tallies.values()) == first.kept
    assert Store(tmp_path / "data").files("instructions") == files
    assert Store(tmp_path / "data").count("instructions") == first.kept


def test_a_larger_limit_on_rerun_adds_only_the_difference(tmp_path):
    ingest(tmp_path / "data", PAPER_SOURCES, limit=30, seed=5)
    second = ingest(tmp_path / "data", PAPER_SOURCES, limit=50, seed=5)
    assert second.kept == 20
    assert sum(t.dropped["already_ingested"] for t in second.tallies.values()) == 30
    ingest(tmp_path / "fresh", PAPER_SOURCES, limit=50, seed=5)
    assert _ids(tmp_path / "data") == _ids(tmp_path / "fresh")


# -- a user's own source ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("column", ["instruction", "prompt", "question", "text"])
def test_own_source_default_text_columns(tmp_path, column):
    path = write_jsonl(tmp_path / "own.jsonl", [{column: "What is a monad?", "source": "my-notes", "id": 1}])
    ingest(tmp_path / "data", [f"notes={path}"])
    [row] = instructions(tmp_path / "data")
    assert (row["text"], row["main_source"], row["original_source"]) == ("What is a monad?", "notes", "my-notes")


def test_own_source_default_column_order(tmp_path):
    path = write_jsonl(tmp_path / "own.jsonl", [{"text": "not this", "prompt": "nor this", "instruction": "this"}])
    ingest(tmp_path / "data", [f"mine={path}"])
    assert [r["text"] for r in instructions(tmp_path / "data")] == ["this"]


def test_own_source_text_column_option(tmp_path, capsys):
    path = write_jsonl(tmp_path / "own.jsonl", [{"body": "Explain tides.", "prompt": "ignored"}])
    rc, out, err = cli(capsys, "--source", f"mine={path}", "--text-column", "body", "--data-dir", str(tmp_path / "d"))
    assert rc == 0, err
    assert [r["text"] for r in instructions(tmp_path / "d")] == ["Explain tides."]
    rc, _, err = cli(capsys, "--source", f"mine={path}", "--text-column", "nope", "--data-dir", str(tmp_path / "e"))
    assert_one_line_error(rc, err, str(path), "nope")


def test_text_column_with_paper_sources_only_is_an_error(capsys, tmp_path):
    rc, _, err = cli(capsys, "--source", f"dsp={DSP}", "--text-column", "query", "--data-dir", str(tmp_path / "d"))
    assert_one_line_error(rc, err, "--text-column")


def test_own_source_turns_list(tmp_path):
    path = write_jsonl(tmp_path / "own.jsonl", [
        {"turns": ["Write a haiku about autumn."]},
        {"turns": ["Compose a travel blog post.", "Rewrite it in one sentence."]},
        {"turns": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define entropy."},
                   {"role": "assistant", "content": "..."}]},
        {"turns": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                   {"role": "user", "content": "Bye"}]},
    ])
    summary = ingest(tmp_path / "data", [f"bench={path}"])
    assert summary.tallies["bench"].dropped["multi_turn"] == 2
    assert set(by_text(tmp_path / "data")) == {"Write a haiku about autumn.", "Define entropy."}


def test_own_source_in_csv_and_parquet(tmp_path):
    (tmp_path / "own.csv").write_text('question,source\n"What is 2 + 2?",quiz\n"A, quoted\nmulti-line one",quiz\n')
    pq.write_table(pa.table({"prompt": ["Tell me a joke."], "source": ["jokes"]}), tmp_path / "own.parquet")
    ingest(tmp_path / "data", [f"quiz={tmp_path / 'own.csv'}", f"fun={tmp_path / 'own.parquet'}"])
    texts = by_text(tmp_path / "data")
    assert texts["A, quoted\nmulti-line one"]["original_source"] == "quiz"
    assert texts["Tell me a joke."]["main_source"] == "fun"
    assert len(texts) == 3


def test_nectar_from_csv(tmp_path):
    (tmp_path / "nectar.csv").write_text('prompt,turns,source\n"\n\nHuman: Hello?\n\nAssistant: ",1,x\n')
    ingest(tmp_path / "data", [f"nectar={tmp_path / 'nectar.csv'}"])
    assert [r["text"] for r in instructions(tmp_path / "data")] == ["Hello?"]


def test_utf8_byte_order_marks_are_not_data(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"prompt": "From a BOM file."}\n')
    (tmp_path / "b.csv").write_bytes(bom + b"prompt\nFrom a BOM csv.\n")
    (tmp_path / "c.json").write_bytes(bom + b'[{"prompt": "From a BOM array."}]')
    specs = [f"a={tmp_path / 'a.jsonl'}", f"b={tmp_path / 'b.csv'}", f"c={tmp_path / 'c.json'}"]
    summary = ingest(tmp_path / "data", specs)
    assert summary.failures == 0
    assert set(by_text(tmp_path / "data")) == {"From a BOM file.", "From a BOM csv.", "From a BOM array."}


# -- loading through `datasets.load_dataset` (the hub path), offline -----------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


def test_hub_loader_reads_a_dataset_directory_with_datasets(tmp_path, hf_cache):
    repo = tmp_path / "lmsys-chatbot_arena_conversations"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "train-00000-of-00001.parquet").write_bytes(CHATBOT_ARENA.read_bytes())
    hub = HubDataset(str(repo), "train")
    source = Source("chatbot_arena", "chatbot_arena_conversations", [hub])
    summary = ingest(tmp_path / "data", [source])
    local = ingest(tmp_path / "local", [f"chatbot_arena={CHATBOT_ARENA}"])
    assert "conversation_a" in hub.columns()
    assert summary.kept == local.kept == 7  # alone, with no other source to share duplicates with
    assert instructions(tmp_path / "data") == instructions(tmp_path / "local")


def test_hub_loader_reads_json_lines_with_datasets(tmp_path, hf_cache):
    repo = tmp_path / "nectar-repo"
    repo.mkdir()
    (repo / "train.jsonl").write_bytes(NECTAR.read_bytes())
    summary = ingest(tmp_path / "data", [Source("nectar", "Nectar", [HubDataset(str(repo), "train")])])
    assert summary.kept == 66 and summary.tallies["nectar"].dropped["multi_turn"] == 24


def test_hub_loader_layout_mismatch_is_a_source_error(tmp_path, hf_cache):
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"question": ["x"]}), repo / "data" / "train.parquet")
    with pytest.raises(SourceError, match="needs column"):
        ingest(tmp_path / "data", [Source("dsp", "domain_specific_preference", [HubDataset(str(repo), "train")])])


def test_hub_id_offline_is_a_one_line_error(capsys, tmp_path, hf_cache, monkeypatch):
    import datasets
    import huggingface_hub

    # the switches HF_HUB_OFFLINE=1 sets, read by both libraries at import time
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rc, out, err = cli(capsys, "--source", "nectar=berkeley-nest/Nectar", "--data-dir", str(tmp_path / "data"))
    assert_one_line_error(rc, err, "berkeley-nest/Nectar:train", "Hugging Face hub")
    assert out == "" and not (tmp_path / "data" / "stages").exists()


def test_source_specs_resolve_to_hub_defaults_without_reading():
    assert [o.label for o in parse_source("nectar").origins] == ["berkeley-nest/Nectar:train"]
    assert [o.label for o in parse_source("ultrafeedback=someone/uf:test_prefs").origins] == ["someone/uf:test_prefs"]
    assert [o.label for o in parse_source("chatbot_arena=lmsys/chatbot_arena_conversations").origins] == [
        "lmsys/chatbot_arena_conversations:train"]


# -- bad input through the CLI ---------------------------------------------------------------------------------
def _bad(capsys, tmp_path, *sources: str) -> str:
    args = [a for s in sources for a in ("--source", s)]
    rc, out, err = cli(capsys, *args, "--data-dir", str(tmp_path / "data"))
    assert out == ""
    assert not (tmp_path / "data" / "stages").exists() and not (tmp_path / "data" / "failures").exists()
    return rc, err


def test_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope" / "data.jsonl"
    rc, err = _bad(capsys, tmp_path, f"nectar={missing}")
    assert_one_line_error(rc, err, str(missing), "no such file")


def test_missing_file_next_to_a_good_source_writes_nothing(capsys, tmp_path):
    rc, err = _bad(capsys, tmp_path, f"dsp={DSP}", f"nectar={tmp_path / 'missing.jsonl'}")
    assert_one_line_error(rc, err, "missing.jsonl")


@pytest.mark.parametrize("spec, needles", [
    ("mystery", ["mystery", "needs a location", "known sources"]),
    ("mystery=someone/dataset", ["mystery", "someone/dataset", "not a local path"]),
    ("dsp", ["dsp", "needs a location"]),
    ("=data.jsonl", ["bad source", "NAME=PATH"]),
    ("two words=x.jsonl", ["bad source"]),
])
def test_unknown_source_name_or_bad_spec(capsys, tmp_path, spec, needles):
    rc, err = _bad(capsys, tmp_path, spec)
    assert_one_line_error(rc, err, *needles)


def test_dsp_from_a_hub_id_says_it_has_no_hub_copy(capsys, tmp_path):
    rc, err = _bad(capsys, tmp_path, "dsp=someone/dsp")
    assert_one_line_error(rc, err, "someone/dsp", "dsp")
    assert "unknown source" not in err


def test_same_source_twice(capsys, tmp_path):
    rc, err = _bad(capsys, tmp_path, f"dsp={DSP}", f"dsp={DSP}")
    assert_one_line_error(rc, err, "dsp", "twice")


def test_columns_that_do_not_fit_the_layout(capsys, tmp_path):
    rc, err = _bad(capsys, tmp_path, f"dsp={NECTAR}")
    assert_one_line_error(rc, err, str(NECTAR), "dsp layout", "query")
    rc, err = _bad(capsys, tmp_path, f"chatbot_arena={OPENHERMES}")
    assert_one_line_error(rc, err, str(OPENHERMES), "conversation_a")
    csv = tmp_path / "nectar.csv"
    csv.write_text("question,answer\nq,a\n")
    rc, err = _bad(capsys, tmp_path, f"nectar={csv}")
    assert_one_line_error(rc, err, str(csv), "prompt")
    own = write_jsonl(tmp_path / "own.jsonl", [{"body": "no default column here"}])
    rc, err = _bad(capsys, tmp_path, f"mine={own}")
    assert_one_line_error(rc, err, str(own), "no text column", "--text-column")


def test_broken_json_lines(capsys, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_bytes(b'{"prompt": "unterminated\n{"prompt": 1,}\n')
    rc, err = _bad(capsys, tmp_path, f"ultrafeedback={path}")
    assert_one_line_error(rc, err, str(path), "row 1", "broken JSON")


def test_broken_json_array(capsys, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"query": "fine"},\n {"query": "oops"\n')
    rc, err = _bad(capsys, tmp_path, f"dsp={path}")
    assert_one_line_error(rc, err, str(path), "broken JSON")


def test_non_utf8_bytes(capsys, tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes('{"prompt": "Caf\u00e9 au lait?"}\n'.encode("latin-1"))
    rc, err = _bad(capsys, tmp_path, f"ultrafeedback={jsonl}")
    assert_one_line_error(rc, err, str(jsonl), "row 1", "UTF-8")
    array = tmp_path / "latin1.json"
    array.write_bytes('[{"query": "Caf\u00e9?"}]'.encode("latin-1"))
    rc, err = _bad(capsys, tmp_path, f"dsp={array}")
    assert_one_line_error(rc, err, str(array), "UTF-8")
    csv = tmp_path / "latin1.csv"
    csv.write_bytes("prompt\nCaf\u00e9?\n".encode("latin-1"))
    rc, err = _bad(capsys, tmp_path, f"mine={csv}")
    assert_one_line_error(rc, err, str(csv), "row 2", "UTF-8")


def test_non_string_text(capsys, tmp_path):
    jsonl = write_jsonl(tmp_path / "numbers.jsonl", [{"prompt": 42}, {"prompt": None}])
    rc, err = _bad(capsys, tmp_path, f"openhermes={jsonl}")
    assert_one_line_error(rc, err, str(jsonl), "row 1", "prompt is int")
    parquet = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"query": [1, 2]}), parquet)
    rc, err = _bad(capsys, tmp_path, f"dsp={parquet}")
    assert_one_line_error(rc, err, str(parquet), "query", "not text")
    arena = write_jsonl(tmp_path / "arena.jsonl", [
        {"conversation_a": [{"role": "user", "content": ["a", "list"]}], "turn": 1, "language": "English"}])
    rc, err = _bad(capsys, tmp_path, f"chatbot_arena={arena}")
    assert_one_line_error(rc, err, str(arena), "row 1", "not text")


def test_records_that_are_not_objects(capsys, tmp_path):
    path = tmp_path / "lists.jsonl"
    path.write_text('["a", "b"]\n"just a string"\n')
    rc, err = _bad(capsys, tmp_path, f"mine={path}")
    assert_one_line_error(rc, err, str(path), "row 1")


def test_unsupported_and_unreadable_files(capsys, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    rc, err = _bad(capsys, tmp_path, f"mine={text}")
    assert_one_line_error(rc, err, str(text), "unsupported file type")
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"this is not parquet at all")
    rc, err = _bad(capsys, tmp_path, f"dsp={fake}")
    assert_one_line_error(rc, err, str(fake), "Parquet")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    rc, err = _bad(capsys, tmp_path, f"dsp={empty_dir}")
    assert_one_line_error(rc, err, str(empty_dir))


@pytest.mark.slow
def test_the_console_command_in_a_real_process(tmp_path):
    """What `facets ingest` prints and returns as a process: no traceback, one line, a non-zero status."""
    command = [sys.executable, "-m", "facets.flows.cli", "ingest", "--data-dir", str(tmp_path / "data")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for source, needle in [(f"nectar={tmp_path / 'missing.jsonl'}", "missing.jsonl"),
                           ("nectar=berkeley-nest/Nectar", "berkeley-nest/Nectar")]:
        done = subprocess.run([*command, "--source", source], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=300)
        assert_one_line_error(done.returncode, done.stderr, needle)
        assert done.stdout == ""
    done = subprocess.run([*command, "--source", f"dsp={DSP}"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0 and done.stderr == ""
    assert summary_rows(done.stdout)["dsp"]["read"] == 150


# -- a bad row in a larger file goes to `failures`, the rest is ingested -------------------------------------------
def test_bad_rows_in_a_large_file_go_to_failures(capsys, tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [orjson.dumps({"prompt": f"Question {i}: why is the sky blue?", "source": "gen"}) for i in range(300)]
    lines[9] = b'{"prompt": "broken'                                   # row 10: broken JSON
    lines[49] = '{"prompt": "caf\u00e9"}'.encode("latin-1")             # row 50: not UTF-8
    lines[99] = b'{"prompt": 12345}'                                   # row 100: non-string text
    lines[149] = b'["not", "an", "object"]'                            # row 150: not an object
    lines[199] = b'{"source": "no prompt here"}'                       # row 200: missing field
    path.write_bytes(b"\n".join(lines) + b"\n")
    rc, out, err = cli(capsys, "--source", f"ultrafeedback={path}", "--data-dir", str(tmp_path / "data"))
    assert rc == 0, err
    assert Store(tmp_path / "data").count("instructions") == 295
    found = failures(tmp_path / "data")
    assert [(f["row"], f["reason"]) for f in found] == [
        (10, "broken_json"), (50, "not_utf8"), (100, "non_string_text"), (150, "not_an_object"),
        (200, "missing_field")]
    assert all(f["key"] == str(path) and f["stage"] == "ingest" and f["source"] == "ultrafeedback" for f in found)
    assert found[0]["raw_output"] == '{"prompt": "broken'
    assert "prompt is int" in found[2]["detail"]
    table = summary_rows(out)
    assert table["ultrafeedback"]["read"] == 300 and table["ultrafeedback"]["kept"] == 295
    for reason in ("broken_json", "not_utf8", "non_string_text", "not_an_object", "missing_field"):
        assert table["ultrafeedback"][reason] == 1
    assert "5 unreadable rows" in out
    # the rows that failed are named on stderr, one line each, with file and row
    assert f"{path}: row 10: " in err and f"{path}: row 200: " in err and "Traceback" not in err


def test_bad_rows_in_csv_and_parquet_go_to_failures(tmp_path):
    csv = tmp_path / "own.csv"
    csv.write_bytes(b"prompt\nfirst good row\n" + "caf\u00e9 bad row\n".encode("latin-1") + b"third good row\n")
    parquet = tmp_path / "own.parquet"
    pq.write_table(pa.table({"query": ["fine query", None, "another fine query"]}), parquet)
    summary = ingest(tmp_path / "data", [f"mine={csv}", f"dsp={parquet}"])
    assert summary.kept == 4 and summary.failures == 2
    assert [(f["key"], f["row"], f["reason"]) for f in failures(tmp_path / "data")] == [
        (str(csv), 3, "not_utf8"), (str(parquet), 2, "non_string_text")]


# -- large files in parts, read by worker processes ----------------------------------------------------------------
def _mixed_jsonl(path: Path, rows: int) -> Path:
    """Good rows, duplicates, rule breakers, blank lines and bad rows, in a fixed order."""
    lines = []
    for i in range(rows):
        if i % 97 == 13:
            lines.append(b'{"prompt": "broken')
        elif i % 89 == 5:
            lines.append(b"")
        elif i % 83 == 7:
            lines.append(b'{"prompt": ' + str(i).encode() + b"}")
        elif i % 61 == 11:
            lines.append(orjson.dumps({"prompt": f"You are bot {i}."}))
        elif i % 17 == 3:
            lines.append(orjson.dumps({"prompt": f"Question {i // 2}: what is {i // 2} squared?"}))  # repeats
        else:
            lines.append(orjson.dumps({"prompt": f"Question {i}: what is {i} squared?", "source": "gen",
                                       "chosen": [{"role": "user", "content": "x"}]}))
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    return path


def _everything(data_dir: Path) -> tuple[list[dict], list[tuple]]:
    return instructions(data_dir), [(f["key"], f["row"], f["reason"], f["raw_output"]) for f in failures(data_dir)]


def test_parts_read_by_workers_give_the_same_result_as_one_process(tmp_path):
    jsonl = _mixed_jsonl(tmp_path / "big.jsonl", 3000)
    parquet = tmp_path / "big.parquet"
    texts = [f"Parquet question {i}?" if i % 50 else None for i in range(4000)]
    pq.write_table(pa.table({"prompt": texts, "source": ["pq"] * 4000}), parquet, row_group_size=300)
    specs = [f"ultrafeedback={jsonl}", f"openhermes={parquet}"]
    one = ingest(tmp_path / "one", specs, workers=1, part_bytes=4096, limit=2500, seed=3)
    two = ingest(tmp_path / "two", specs, workers=2, part_bytes=4096, limit=2500, seed=3)
    whole = ingest(tmp_path / "whole", specs, workers=2, limit=2500, seed=3)  # below PART_BYTES: one part each
    assert len(Path(jsonl).read_bytes()) > 20 * 4096  # many parts
    assert one.tallies == two.tallies == whole.tallies
    assert one.workers == 1 and whole.workers == 1  # one part per file: nothing to share out
    if threading.active_count() == 1:  # a thread left behind by another test would make this run in-process
        assert two.workers == 2
    assert _everything(tmp_path / "one") == _everything(tmp_path / "two") == _everything(tmp_path / "whole")
    rows = [(key, row, reason) for key, row, reason, _ in _everything(tmp_path / "two")[1]]
    broken = [(str(jsonl), i + 1, "broken_json") for i in range(3000) if i % 97 == 13]
    assert [r for r in rows if r[2] == "broken_json"] == broken  # line numbers across part boundaries
    assert [r[1] for r in rows if r[0] == str(parquet)] == [i + 1 for i in range(0, 4000, 50)]
    assert two.tallies["ultrafeedback"].read == 3000 - sum(1 for i in range(3000) if i % 89 == 5 and i % 97 != 13)


def test_json_lines_parts_cover_every_line_once(tmp_path):
    from facets.ingest.sources import JsonLinesFile, map_rows, own_layout

    path = _mixed_jsonl(tmp_path / "f.jsonl", 500)
    whole = JsonLinesFile(path)
    layout = own_layout("prompt")
    expected = [(r.number, r.outcome) for r in map_rows(whole, layout)]
    for part_bytes in (1, 100, 1000, 7777, 10**9):
        parts = whole.parts(part_bytes)
        numbered, base = [], 0
        for part in parts:
            rows = list(map_rows(part, layout))
            numbered += [(base + r.number, r.outcome) for r in rows]
            base += len(rows)
        assert [(n, str(o)) for n, o in numbered] == [(n, str(o)) for n, o in expected], part_bytes


def test_a_threaded_process_judges_parts_itself(tmp_path):
    """Forking beside other threads risks a deadlock (a Prefect task run has several): no pool there."""
    jsonl = _mixed_jsonl(tmp_path / "big.jsonl", 1500)
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        threaded=ingest(tmp_path / "threaded", [f"mine={jsonl}"], workers=2, part_bytes=4096)))
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive()
    alone = ingest(tmp_path / "alone", [f"mine={jsonl}"], workers=1)
    assert results["threaded"].tallies == alone.tallies and results["threaded"].workers == 1
    assert _everything(tmp_path / "threaded") == _everything(tmp_path / "alone")


# -- the printed summary --------------------------------------------------------------------------------------------
def test_cli_prints_kept_and_dropped_per_source_and_reason(capsys, tmp_path):
    rc, out, err = cli(capsys, *[a for s in PAPER_SOURCES for a in ("--source", s)], "--data-dir", str(tmp_path / "d"))
    assert rc == 0, err
    table = summary_rows(out)
    assert list(table) == ["nectar", "openhermes", "ultrafeedback", "chatbot_arena", "dsp", "total"]
    assert table["nectar"] == {"read": 100, "kept": 66, "multi_turn": 24, "not_english": 0, "empty": 0,
                               "too_long": 0, "role_play": 10, "duplicate": 0}
    assert table["chatbot_arena"]["not_english"] == 1 and table["ultrafeedback"]["empty"] == 1
    assert table["total"]["kept"] == 233 and table["total"]["read"] == 285
    for name, row in table.items():
        assert row["read"] == row["kept"] + sum(v for k, v in row.items() if k not in ("read", "kept")), name
    assert "233 new instructions" in out
    rc, out, _ = cli(capsys, *[a for s in PAPER_SOURCES for a in ("--source", s)], "--data-dir", str(tmp_path / "d"))
    assert summary_rows(out)["total"]["already_ingested"] == 233 and "0 new instructions" in out


def test_options_errors_from_the_python_api(tmp_path):
    with pytest.raises(IngestError):
        ingest(tmp_path / "data", [])
    with pytest.raises(IngestError):
        ingest(tmp_path / "data", [f"dsp={DSP}"], max_chars=0)


def test_instructions_are_stored_in_bucket_order_so_a_shard_reads_only_the_row_groups_of_its_range(tmp_path):
    import pyarrow.dataset as ds

    from facets.pipeline.selection import load_instructions

    store = Store(str(tmp_path / "data"))
    ingest(store, [f"nectar={NECTAR}", f"openhermes={OPENHERMES}"], seed=0, rows_per_group=16, workers=1)
    (path,) = store.files("instructions")
    groups = [pq.ParquetFile(path).metadata.row_group(i) for i in range(pq.ParquetFile(path).num_row_groups)]
    bounds = [(g.column(1).statistics.min, g.column(1).statistics.max) for g in groups]  # the bucket column
    assert len(groups) > 4 and all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))
    everything = {i.id: i for i in load_instructions(store, store.read("instructions", columns=["id"])
                                                     .column("id").to_pylist())}
    lo, hi = 256, 511
    in_range = sorted(iid for iid, i in everything.items() if lo <= i.bucket <= hi)
    assert sorted(i.id for i in load_instructions(store, in_range, (lo, hi))) == in_range
    wanted = (ds.field("bucket") >= lo) & (ds.field("bucket") <= hi)
    (fragment,) = ds.dataset([path], format="parquet").get_fragments()
    read = fragment.split_by_row_group(filter=wanted)  # the row groups the statistics cannot rule out
    assert len(read) <= len(groups) // 4 + 2
