"""Schemas: instruction identity, preference validation, release row layouts and their Parquet form."""
from __future__ import annotations

import hashlib
import json
import random
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from facets.schemas import (
    DIMENSIONS,
    NUM_BUCKETS,
    BenchRow,
    ChatMessage,
    DimensionBranch,
    Failure,
    GoldResponse,
    Instruction,
    Pair,
    Preference,
    PreferenceLeaf,
    PreferencePairRow,
    PreferenceSet,
    PreferenceTree,
    PreferenceTreeBody,
    RMRow,
    Rubric,
    ScoreDescriptions,
    SFTRow,
    SubdimensionBranch,
    SystemMessage,
    arrow_schema,
    bucket_of,
    fingerprint,
    from_table,
    instruction_id,
    normalise_text,
    to_table,
)

PUBLISHED = Path(__file__).parent / "data" / "published"


# -- fixtures: real published examples --------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_468() -> dict:
    """Multifaceted Bench record 468 as the Janus README shows it (full preference set and rubrics)."""
    return json.loads((PUBLISHED / "janus_readme_5529fba_multifaceted_bench_example_468.json").read_text())["468"]


@pytest.fixture(scope="module")
def bench_flask() -> dict:
    """A Multifaceted Bench record from an older README revision (FLASK source label, no preference set)."""
    return json.loads((PUBLISHED / "janus_readme_b6df510_multifaceted_bench_example.json").read_text())


@pytest.fixture(scope="module")
def collection_example() -> dict:
    """A Multifaceted Collection row as the Janus README shows it (system, instruction, output only)."""
    return json.loads((PUBLISHED / "janus_readme_5529fba_multifaceted_collection_example.json").read_text())


def _prefs(**overrides: str) -> list[dict]:
    base = [
        {"dimension": d, "subdimension": f"sub-{d}", "preference": f"pref {d}", "description": f"desc {d}"}
        for d in DIMENSIONS
    ]
    for item in base:
        if item["dimension"] in overrides:
            item["subdimension"] = overrides[item["dimension"]]
    return base


def _branch(dimension: str, subs: tuple[str, ...] = ("a", "b", "c")) -> dict:
    return {
        "dimension": dimension,
        "subdimensions": [
            {"subdimension": s, "preferences": [{"preference": f"{dimension}/{s}", "description": "why"}]} for s in subs
        ],
    }


def _tree_body(**subs: tuple[str, ...]) -> dict:
    return {"dimensions": [_branch(d, subs.get(d, ("a", "b", "c"))) for d in DIMENSIONS]}


def _sft_from_468(rec: dict) -> SFTRow:
    return SFTRow(
        main_source=rec["main_source"],
        original_source=rec["original_source"],
        preference_set=rec["preference"],
        system=rec["system_prompt"],
        prompt=rec["user_prompt"],
        output=rec["reference_answer"],
    )


def _bench_from_468(rec: dict) -> BenchRow:
    return BenchRow(
        source=rec["original_source"],
        preference_set=rec["preference"],
        system=rec["system_prompt"],
        prompt=rec["user_prompt"],
        reference_answer=rec["reference_answer"],
        rubrics=rec["rubric"],
    )


def _chat(user: str, assistant: str) -> list[dict]:
    return [{"content": user, "role": "user"}, {"content": assistant, "role": "assistant"}]


def _dpo_from_468(rec: dict) -> PreferencePairRow:
    return PreferencePairRow(
        main_source=rec["main_source"],
        original_source=rec["original_source"],
        system=rec["system_prompt"],
        prompt=rec["user_prompt"],
        chosen=_chat(rec["user_prompt"], rec["reference_answer"]),
        rejected=_chat(rec["user_prompt"], "Algorithms matter because computers need them."),
    )


# -- instruction ids (decision 2) and buckets (decision 3) ------------------------------------------
def test_instruction_id_nfc_composed_and_decomposed_agree():
    composed = "Caf\u00e9 au lait: what is it?"
    decomposed = "Cafe\u0301 au lait: what is it?"
    assert composed != decomposed
    assert unicodedata.normalize("NFC", decomposed) == composed
    assert normalise_text(decomposed) == composed
    assert instruction_id(composed) == instruction_id(decomposed)


def test_instruction_id_whitespace_runs_and_ends_collapse():
    canonical = "Explain why algorithms matter."
    variants = [
        "  Explain why algorithms matter.  ",
        "Explain  why\talgorithms\n\nmatter.",
        "\nExplain \u00a0why algorithms   matter.\r\n",
    ]
    for text in variants:
        assert normalise_text(text) == canonical
        assert instruction_id(text) == instruction_id(canonical)
    # whitespace between words is collapsed, never removed
    assert instruction_id("Explainwhy algorithms matter.") != instruction_id(canonical)


def test_instruction_id_keeps_case():
    assert normalise_text("Hello World") == "Hello World"
    assert instruction_id("Hello World") != instruction_id("hello world")


def test_instruction_id_is_versioned_and_pinned():
    iid = instruction_id("hello   world ")
    version, digest = iid.split("-", 1)
    assert version == "n1"
    assert len(digest) == 24 and all(c in "0123456789abcdef" for c in digest)
    # the rule is frozen: this value must never change (it would re-key every stage)
    assert iid == "n1-" + hashlib.sha256(b"hello world").hexdigest()[:24]


def test_bucket_is_stable_in_range_and_spread():
    iid = instruction_id("hello world")
    expected = int.from_bytes(hashlib.blake2b(iid.encode(), digest_size=8).digest(), "big") % NUM_BUCKETS
    assert bucket_of(iid) == expected
    assert [bucket_of(iid) for _ in range(3)] == [expected] * 3
    buckets = [bucket_of(instruction_id(f"instruction number {i}")) for i in range(4000)]
    assert all(0 <= b < NUM_BUCKETS for b in buckets)
    assert len(set(buckets)) > NUM_BUCKETS * 0.9  # a hash, not a constant or a counter


def test_instruction_from_text_and_validation():
    ins = Instruction.from_text("  Tell me\u00a0a  joke. ", "nectar", "lmsys", lang="en")
    assert ins.id == instruction_id("Tell me a joke.")
    assert ins.bucket == bucket_of(ins.id)
    assert ins.normalised == "Tell me a joke."
    assert ins.metadata == {"lang": "en"}
    good = ins.model_dump()
    with pytest.raises(ValidationError, match="is not the id of the text"):
        Instruction(**{**good, "id": instruction_id("Tell me a Joke.")})
    with pytest.raises(ValidationError, match="bucket"):
        Instruction(**{**good, "bucket": (ins.bucket + 1) % NUM_BUCKETS})
    with pytest.raises(ValidationError):
        Instruction(**{**good, "bucket": NUM_BUCKETS})
    with pytest.raises(ValidationError):
        Instruction(**{**good, "unexpected": 1})
    # the same text with other whitespace is the same instruction
    assert Instruction(**{**good, "text": "Tell me a joke."}).id == ins.id


def test_instruction_metadata_round_trip(tmp_path):
    rows = [
        Instruction.from_text("What is 2+2?", "dsp", "academy", lang="en", note="tricky, \"quoted\""),
        Instruction.from_text("Say hi", "nectar"),
    ]
    table = to_table(rows, Instruction)
    assert pa.types.is_map(table.schema.field("metadata").type)
    pq.write_table(table, tmp_path / "i.parquet")
    back = from_table(pq.read_table(tmp_path / "i.parquet"), Instruction)
    assert back == rows
    assert back[0].metadata == {"lang": "en", "note": "tricky, \"quoted\""}
    assert back[1].metadata == {}


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": 2}, "v1") == fingerprint({"b": 2, "a": 1}, "v1")
    assert fingerprint({"a": 1}, "v1") != fingerprint({"a": 1}, "v2")
    assert fingerprint("a", "b") != fingerprint("ab")
    pref = Preference(dimension="style", subdimension="tone", preference="p", description="d")
    assert fingerprint(pref) == fingerprint(pref.model_dump(mode="json"))
    assert len(fingerprint("x")) == 32
    with pytest.raises(TypeError):
        fingerprint(object())


# -- preferences, sets and trees -----------------------------------------------------------------------
def test_preference_dimension_must_be_one_of_four():
    for d in DIMENSIONS:
        assert Preference(dimension=d, subdimension="s", preference="p", description="d").dimension == d
    for bad in ("Style", "tone", "background knowledge", ""):
        with pytest.raises(ValidationError):
            Preference(dimension=bad, subdimension="s", preference="p", description="d")
    with pytest.raises(ValidationError):
        Preference(dimension="style", subdimension="", preference="p", description="d")
    assert list(Preference.model_fields) == ["dimension", "subdimension", "preference", "description"]


def _set(preferences: list[dict]) -> PreferenceSet:
    return PreferenceSet(instruction_id="i", fingerprint="f", set_index=0, preferences=preferences)


def test_preference_set_exactly_one_per_dimension():
    prefs = _prefs()
    assert [p.dimension for p in _set(prefs).preferences] == list(DIMENSIONS)
    with pytest.raises(ValidationError):
        _set(prefs[:3])
    with pytest.raises(ValidationError):
        _set(prefs + [dict(prefs[0], subdimension="other")])
    repeated = [prefs[0], prefs[1], prefs[2], dict(prefs[0], subdimension="other")]
    with pytest.raises(ValidationError, match="exactly one preference per dimension"):
        _set(repeated)


def test_preference_set_comes_back_in_canonical_order():
    prefs = _prefs()
    rng = random.Random(7)
    for _ in range(5):
        shuffled = prefs[:]
        rng.shuffle(shuffled)
        got = _set(shuffled).preferences
        assert [p.dimension for p in got] == list(DIMENSIONS)
        assert [p.subdimension for p in got] == [f"sub-{d}" for d in DIMENSIONS]


def test_tree_body_needs_each_dimension_once():
    body = PreferenceTreeBody.model_validate(_tree_body())
    assert [b.dimension for b in body.dimensions] == list(DIMENSIONS)
    shuffled = _tree_body()
    shuffled["dimensions"].reverse()
    assert [b.dimension for b in PreferenceTreeBody.model_validate(shuffled).dimensions] == list(DIMENSIONS)
    missing = _tree_body()
    missing["dimensions"] = missing["dimensions"][:3]
    with pytest.raises(ValidationError):
        PreferenceTreeBody.model_validate(missing)
    twice = _tree_body()
    twice["dimensions"][3] = _branch("style", ("x", "y", "z"))
    with pytest.raises(ValidationError, match="exactly once"):
        PreferenceTreeBody.model_validate(twice)


def test_tree_subdimensions_at_least_three_distinct():
    with pytest.raises(ValidationError):
        PreferenceTreeBody.model_validate(_tree_body(style=("clarity", "tone")))
    with pytest.raises(ValidationError, match="repeat"):
        PreferenceTreeBody.model_validate(_tree_body(harmlessness=("safety", "morality", "Safety")))
    with pytest.raises(ValidationError, match="repeat"):
        PreferenceTreeBody.model_validate(_tree_body(style=("clarity", " tone", "tone ", "format")))
    with pytest.raises(ValidationError, match="repeat"):
        DimensionBranch.model_validate(_branch("style", ("Clarity", "clarity", "format")))
    ok = PreferenceTreeBody.model_validate(_tree_body(style=("clarity", "tone", "format", "vividness")))
    assert [s.subdimension for s in ok.dimensions[0].subdimensions] == ["clarity", "tone", "format", "vividness"]
    with pytest.raises(ValidationError):
        SubdimensionBranch(subdimension="clarity", preferences=[])


# -- release rows against the published examples -----------------------------------------------------
RELEASE_COLUMNS = {
    SFTRow: ["main_source", "original_source", "preference_set", "system", "prompt", "output"],
    PreferencePairRow: ["main_source", "original_source", "system", "prompt", "chosen", "rejected"],
    RMRow: ["input", "chosen", "rejected"],
    BenchRow: ["source", "preference_set", "system", "prompt", "reference_answer", "rubrics"],
}


@pytest.mark.parametrize("model", list(RELEASE_COLUMNS), ids=lambda m: m.__name__)
def test_release_columns_exact_names_and_order(model):
    assert arrow_schema(model).names == RELEASE_COLUMNS[model]
    assert [f.alias or n for n, f in model.model_fields.items()] == RELEASE_COLUMNS[model]


def _is_list_of_struct(t: pa.DataType, names: list[str]) -> bool:
    return pa.types.is_list(t) and pa.types.is_struct(t.value_type) and [f.name for f in t.value_type] == names


def test_release_arrow_types_are_nested_not_strings():
    pref_fields = ["dimension", "subdimension", "preference", "description"]
    for model in (SFTRow, BenchRow):
        t = arrow_schema(model).field("preference_set").type
        assert _is_list_of_struct(t, pref_fields), t
        assert all(f.type == pa.string() for f in t.value_type)
    for side in ("chosen", "rejected"):
        t = arrow_schema(PreferencePairRow).field(side).type
        assert _is_list_of_struct(t, ["content", "role"]), t
    rm = arrow_schema(RMRow)
    assert [rm.field(n).type for n in rm.names] == [pa.string()] * 3
    rubrics = arrow_schema(BenchRow).field("rubrics").type
    assert _is_list_of_struct(rubrics, ["criteria", "score_descriptions"])
    scores = rubrics.value_type.field("score_descriptions").type
    assert pa.types.is_struct(scores)
    assert [f.name for f in scores] == ["1", "2", "3", "4", "5"]
    assert all(f.type == pa.string() for f in scores)


def test_published_468_maps_to_sft_and_bench(bench_468):
    sft = _sft_from_468(bench_468)
    assert [p.dimension for p in sft.preference_set] == list(DIMENSIONS)
    assert [p.model_dump() for p in sft.preference_set] == bench_468["preference"]
    assert sft.prompt == "Explain why algorithms are important in data science?"
    assert (sft.main_source, sft.original_source) == ("mpa", "alpaca")

    bench = _bench_from_468(bench_468)
    assert len(bench.rubrics) == 4
    assert bench.rubrics[0].criteria == bench_468["rubric"][0]["criteria"]
    assert bench.rubrics[3].score_descriptions.five == bench_468["rubric"][3]["score_descriptions"]["5"]
    # dumped by alias, the rubrics are the published JSON exactly
    assert bench.model_dump(by_alias=True)["rubrics"] == bench_468["rubric"]
    assert to_table([bench], BenchRow).to_pylist()[0]["rubrics"] == bench_468["rubric"]
    assert to_table([sft], SFTRow).to_pylist()[0]["preference_set"] == bench_468["preference"]


def test_published_bench_rubrics_and_missing_preference_set(bench_flask):
    rubrics = [Rubric.model_validate(r) for r in bench_flask["rubric"]]
    assert len(rubrics) == 4
    assert rubrics[0].score_descriptions.model_dump(by_alias=True) == bench_flask["rubric"][0]["score_descriptions"]
    base = dict(
        source=bench_flask["source"],
        system=bench_flask["system"],
        prompt=bench_flask["prompt"],
        reference_answer=bench_flask["reference_answer"],
        rubrics=bench_flask["rubric"],
    )
    # this README revision omits the preference set; a release row must carry one
    with pytest.raises(ValidationError, match="preference_set"):
        BenchRow(**base)
    row = BenchRow(**base, preference_set=_prefs())
    assert row.source == "Alpha-nlg (art)"
    with pytest.raises(ValidationError):
        BenchRow(**{**base, "rubrics": bench_flask["rubric"][:3]}, preference_set=_prefs())
    with pytest.raises(ValidationError):
        ScoreDescriptions.model_validate({"1": "a", "2": "b", "3": "c", "4": "d"})


def test_published_collection_example_maps_to_sft_rm_and_dpo(collection_example, bench_468):
    ex = collection_example
    assert set(ex) == {"system", "instruction", "output"}  # the README calls the prompt `instruction`
    sft = SFTRow(
        main_source="mpa",
        original_source="alpaca",
        preference_set=bench_468["preference"],
        system=ex["system"],
        prompt=ex["instruction"],
        output=ex["output"],
    )
    assert sft.output.startswith('The statement "The sun rises in the west" is false.')
    assert "\nStatement:" in sft.prompt  # text kept verbatim (no stripping or collapsing in releases)
    rm = RMRow(input=sft.system + "\n" + sft.prompt, chosen=sft.output, rejected="It is true.")
    assert rm.input.split("\n", 1) == [ex["system"], ex["instruction"]]
    dpo = PreferencePairRow(
        main_source="mpa",
        original_source="alpaca",
        system=ex["system"],
        prompt=ex["instruction"],
        chosen=_chat(ex["instruction"], ex["output"]),
        rejected=_chat(ex["instruction"], "It is true."),
    )
    assert [m.role for m in dpo.chosen] == ["user", "assistant"]
    assert to_table([dpo], PreferencePairRow).to_pylist()[0]["chosen"] == _chat(ex["instruction"], ex["output"])


def test_release_rows_reject_bad_rows(bench_468):
    good = _sft_from_468(bench_468).model_dump()
    with pytest.raises(ValidationError):
        SFTRow(**{**good, "preference_set": good["preference_set"][:3]})
    with pytest.raises(ValidationError):
        SFTRow(**{**good, "preference_set": [good["preference_set"][0]] * 4})
    with pytest.raises(ValidationError):
        SFTRow(**{**good, "system": ""})
    with pytest.raises(ValidationError):
        SFTRow(**good, extra_column="x")
    with pytest.raises(ValidationError):
        RMRow(input="i", chosen="", rejected="r")


@pytest.mark.parametrize(
    "chat",
    [
        [{"content": "a", "role": "assistant"}, {"content": "u", "role": "user"}],
        [{"content": "u", "role": "user"}],
        [{"content": "u", "role": "user"}, {"content": "a", "role": "assistant"}, {"content": "u2", "role": "user"}],
        [{"content": "s", "role": "system"}, {"content": "a", "role": "assistant"}],
        [{"content": "u", "role": "user"}, {"content": "u", "role": "user"}],
        [],
    ],
    ids=["assistant-first", "one-message", "three-messages", "system-role", "user-user", "empty"],
)
def test_dpo_chat_must_be_user_then_assistant(bench_468, chat):
    good = _dpo_from_468(bench_468).model_dump()
    assert [m["role"] for m in good["chosen"]] == ["user", "assistant"]
    with pytest.raises(ValidationError):
        PreferencePairRow(**{**good, "chosen": chat})
    with pytest.raises(ValidationError):
        PreferencePairRow(**{**good, "rejected": chat})
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"content": "x", "role": "tool"})


# -- Parquet round trip of every schema -------------------------------------------------------------
def _examples(bench_468: dict) -> dict[type, list]:
    when = datetime(2024, 5, 28, 12, 30, 15, 123456, tzinfo=timezone.utc)
    prefs = bench_468["preference"]
    tree = PreferenceTree(
        instruction_id="n1-abc", fingerprint="fp-tree", created_at=when, model="gpt-4-0125-preview", **_tree_body()
    )
    return {
        Instruction: [Instruction.from_text("Explain  algorithms", "mpa", "alpaca", k="v"), Instruction.from_text("Hi", "dsp")],
        PreferenceTree: [tree],
        PreferenceSet: [
            PreferenceSet(instruction_id="n1-abc", fingerprint=f"fp{k}", created_at=when, set_index=k, preferences=prefs)
            for k in range(3)
        ],
        SystemMessage: [
            SystemMessage(instruction_id="n1-abc", fingerprint="fp", created_at=when, set_index=1,
                          text=bench_468["system_prompt"], model="gpt-4", prompt_version="sys-v1")
        ],
        GoldResponse: [
            GoldResponse(instruction_id="n1-abc", fingerprint="fp", created_at=when, set_index=2,
                         text=bench_468["reference_answer"], model="gpt-4", prompt_version="gold-v1")
        ],
        Pair: [Pair(instruction_id="n1-abc", fingerprint="fp", created_at=when, chosen_index=0, rejected_index=2)],
        Failure: [
            Failure(stage="system_messages", key="n1-abc/1", reason="too short", raw_output="You are.", row=3, created_at=when),
            Failure(stage="responses", key="n1-abd/0", reason="max_tokens"),
        ],
        SFTRow: [_sft_from_468(bench_468)],
        PreferencePairRow: [_dpo_from_468(bench_468)],
        RMRow: [RMRow(input=bench_468["system_prompt"] + "\n" + bench_468["user_prompt"],
                      chosen=bench_468["reference_answer"], rejected="No.")],
        BenchRow: [_bench_from_468(bench_468)],
        Rubric: [Rubric.model_validate(r) for r in bench_468["rubric"]],
        Preference: [Preference.model_validate(p) for p in prefs],
        PreferenceLeaf: [PreferenceLeaf(preference="p", description="d")],
        ChatMessage: [ChatMessage(content="c", role="user")],
    }


def test_parquet_round_trip_every_schema(tmp_path, bench_468):
    examples = _examples(bench_468)
    for model, rows in examples.items():
        path = tmp_path / f"{model.__name__}.parquet"
        pq.write_table(to_table(rows, model), path)
        table = pq.read_table(path)
        assert table.schema.equals(arrow_schema(model)), model.__name__
        assert table.num_rows == len(rows)
        back = from_table(table, model)
        assert back == rows, model.__name__
    # the tree's nested branches survive, in canonical dimension order
    tree = from_table(pq.read_table(tmp_path / "PreferenceTree.parquet"), PreferenceTree)[0]
    assert [b.dimension for b in tree.dimensions] == list(DIMENSIONS)
    assert tree.dimensions[2].subdimensions[1].preferences[0].preference == "informativeness/b"
    assert tree.created_at == datetime(2024, 5, 28, 12, 30, 15, 123456, tzinfo=timezone.utc)


def test_every_stage_model_is_covered_by_round_trip(bench_468):
    from facets.storage import TABLE_MODELS

    assert set(TABLE_MODELS.values()) <= set(_examples(bench_468))


def test_to_table_rejects_rows_of_another_model(bench_468):
    sft = _sft_from_468(bench_468)
    # Arrow alone would fill RMRow's columns with nulls (despite "not null") and drop the SFT columns
    with pytest.raises(TypeError, match="RMRow"):
        to_table([sft], RMRow)
    with pytest.raises(TypeError):
        to_table([{"input": "i", "chosen": "c", "rejected": "r"}], RMRow)
    assert to_table([], RMRow).schema == arrow_schema(RMRow)
    assert to_table(iter([sft]), SFTRow).num_rows == 1


def test_datasets_loads_release_files_as_nested_features(tmp_path, bench_468):
    import datasets

    examples = _examples(bench_468)
    files = {}
    for model in (SFTRow, PreferencePairRow, BenchRow):
        files[model] = str(tmp_path / f"{model.__name__}.parquet")
        pq.write_table(to_table(examples[model] * 2, model), files[model])
    cache = str(tmp_path / "hf-cache")

    sft = datasets.load_dataset("parquet", data_files=files[SFTRow], split="train", cache_dir=cache)
    assert sft.column_names == RELEASE_COLUMNS[SFTRow]
    feature = sft.features["preference_set"]
    assert isinstance(feature, datasets.List), feature
    assert list(feature.feature) == ["dimension", "subdimension", "preference", "description"]
    assert feature.feature["dimension"] == datasets.Value("string")
    item = sft[0]["preference_set"]
    assert isinstance(item, list) and isinstance(item[0], dict)
    assert item == bench_468["preference"]

    dpo = datasets.load_dataset("parquet", data_files=files[PreferencePairRow], split="train", cache_dir=cache)
    assert dpo.column_names == RELEASE_COLUMNS[PreferencePairRow]
    for side in ("chosen", "rejected"):
        feature = dpo.features[side]
        assert isinstance(feature, datasets.List), feature
        assert feature.feature == {"content": datasets.Value("string"), "role": datasets.Value("string")}
    assert dpo[0]["chosen"] == _chat(bench_468["user_prompt"], bench_468["reference_answer"])
    assert [m["role"] for m in dpo[1]["rejected"]] == ["user", "assistant"]

    bench = datasets.load_dataset("parquet", data_files=files[BenchRow], split="train", cache_dir=cache)
    rubric_feature = bench.features["rubrics"]
    assert isinstance(rubric_feature, datasets.List)
    assert list(rubric_feature.feature["score_descriptions"]) == ["1", "2", "3", "4", "5"]
    assert bench[0]["rubrics"] == bench_468["rubric"]
