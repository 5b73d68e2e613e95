"""Storage: immutable Parquet stage files, atomic writes, reads, and the DuckDB catalog over them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from facets.schemas import (
    DIMENSIONS,
    Failure,
    Instruction,
    Pair,
    PreferenceSet,
    PreferenceTreeBody,
    RMRow,
    SFTRow,
    SystemMessage,
    arrow_schema,
    from_table,
    to_table,
)
from facets.storage import FAILURES, STAGE_MODELS, TABLE_MODELS, Catalog, Store, new_writer_id

WHEN = datetime(2024, 6, 1, 8, 0, 0, tzinfo=timezone.utc)


def _instructions(n: int, prefix: str = "instruction") -> list[Instruction]:
    return [Instruction.from_text(f"{prefix} {i}", "nectar", "lmsys", n=str(i)) for i in range(n)]


def _prefs() -> list[dict]:
    return [{"dimension": d, "subdimension": f"s-{d}", "preference": f"p-{d}", "description": f"d-{d}"} for d in DIMENSIONS]


def _sets(n: int) -> list[PreferenceSet]:
    return [
        PreferenceSet(instruction_id=f"n1-{i // 3:04d}", fingerprint=f"fp-{i}", created_at=WHEN, set_index=i % 3,
                      preferences=_prefs())
        for i in range(n)
    ]


def _failures(n: int, stage: str = "responses") -> list[Failure]:
    return [Failure(stage=stage, key=f"k{i}", reason="max_tokens", raw_output=f"raw {i}", created_at=WHEN) for i in range(n)]


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        yield str(tmp_path / "data")
    else:
        uri = f"memory://facets-test-{uuid.uuid4().hex}"
        yield uri
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            fs.rm(path, recursive=True)


@pytest.fixture
def memory_root() -> str:
    uri = f"memory://facets-test-{uuid.uuid4().hex}"
    yield uri
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# -- write / read --------------------------------------------------------------------------------------
def test_write_read_round_trip(root):
    store = Store(root)
    assert store.is_local == (not root.startswith("memory://"))
    rows = _instructions(5)
    path = store.write("instructions", rows)
    assert path.endswith(".parquet") and "/stages/instructions/" in path
    assert store.fs.exists(path)
    table = store.read("instructions")
    assert table.schema.equals(arrow_schema(Instruction))
    assert sorted(table.column("id").to_pylist()) == sorted(r.id for r in rows)
    assert sorted(from_table(table, Instruction), key=lambda r: r.id) == sorted(rows, key=lambda r: r.id)
    assert store.count("instructions") == 5

    store.write("preference_sets", _sets(6))
    sets = store.read("preference_sets", columns=["fingerprint", "set_index"])
    assert sets.column_names == ["fingerprint", "set_index"]
    filtered = store.read("preference_sets", filter=ds.field("set_index") == 2)
    assert sorted(filtered.column("fingerprint").to_pylist()) == ["fp-2", "fp-5"]
    nested = store.read("preference_sets").column("preferences").to_pylist()[0]
    assert [p["dimension"] for p in nested] == list(DIMENSIONS)

    assert store.write_failures(_failures(2)) is not None
    assert store.count(FAILURES) == 2
    assert store.files(FAILURES)[0].startswith(store.path("failures") + "/")


def test_each_write_is_a_new_file_named_by_writer(root):
    store = Store(root, writer_id="alpha")
    first = store.write("instructions", _instructions(2, "a"))
    second = store.write("instructions", _instructions(2, "b"))
    assert first != second
    for path in (first, second):
        name = path.rsplit("/", 1)[-1]
        assert name.startswith("part-alpha-") and name.endswith(".parquet")
    assert store.files("instructions") == sorted([first, second])
    assert store.count("instructions") == 4
    assert store.write("instructions", []) is None
    assert len(store.files("instructions")) == 2
    labelled = store.write("instructions", _instructions(1, "c"), label="bucket-0007")
    assert labelled.rsplit("/", 1)[-1].startswith("bucket-0007-alpha-")


def test_two_writers_one_stage_do_not_collide(root):
    one, two = Store(root), Store(root)
    assert one.writer_id != two.writer_id
    assert str(os.getpid()) in one.writer_id
    paths = set()
    for i in range(3):
        paths.add(one.write("failures", _failures(2, stage=f"one{i}")))
        paths.add(two.write("failures", _failures(3, stage=f"two{i}")))
    assert len(paths) == 6
    files = one.files(FAILURES)
    assert files == two.files(FAILURES) == sorted(paths)
    assert sum(one.writer_id in f for f in files) == 3
    assert sum(two.writer_id in f for f in files) == 3
    assert one.count(FAILURES) == 3 * 2 + 3 * 3
    stages = one.read(FAILURES).column("stage").to_pylist()
    assert sorted(set(stages)) == sorted([f"one{i}" for i in range(3)] + [f"two{i}" for i in range(3)])
    assert len({new_writer_id() for _ in range(20)}) == 20


def test_same_writer_id_twice_loses_nothing(root):
    # e.g. a worker restarted under its fixed name: its sequence starts again at 0
    first, again = Store(root, writer_id="worker1"), Store(root, writer_id="worker1")
    a = first.write("failures", _failures(2, stage="before"))
    b = again.write("failures", _failures(3, stage="after"))
    assert a != b
    assert "worker1" in a.rsplit("/", 1)[-1] and "worker1" in b.rsplit("/", 1)[-1]
    assert first.count(FAILURES) == 5
    assert sorted(set(first.read(FAILURES).column("stage").to_pylist())) == ["after", "before"]


@pytest.mark.parametrize("table", sorted(TABLE_MODELS))
def test_read_of_empty_stage_has_derived_schema(tmp_path, table):
    store = Store(tmp_path / "empty")
    got = store.read(table)
    assert got.num_rows == 0
    assert got.schema.equals(arrow_schema(TABLE_MODELS[table]))
    assert store.count(table) == 0
    assert store.files(table) == []
    assert store.read_polars(table).shape == (0, len(arrow_schema(TABLE_MODELS[table])))


def test_read_empty_with_columns(root):
    store = Store(root)
    got = store.read("pairs", columns=["instruction_id", "chosen_index"])
    assert got.column_names == ["instruction_id", "chosen_index"] and got.num_rows == 0


def test_read_polars(root):
    store = Store(root)
    store.write("preference_sets", _sets(4))
    store.write("preference_sets", _sets(2))
    df = store.read_polars("preference_sets")
    assert isinstance(df, pl.DataFrame)
    assert df.height == 6
    assert df.columns == arrow_schema(PreferenceSet).names
    assert df.schema["preferences"] == pl.List(
        pl.Struct({"dimension": pl.String, "subdimension": pl.String, "preference": pl.String, "description": pl.String})
    )
    assert df.filter(pl.col("fingerprint") == "fp-3")["set_index"].to_list() == [0]
    first = df.sort("fingerprint")["preferences"][0].to_list()
    assert [p["dimension"] for p in first] == list(DIMENSIONS)
    assert store.read_polars("preference_sets", columns=["fingerprint"]).columns == ["fingerprint"]


def test_writing_rows_of_the_wrong_model_raises(root):
    store = Store(root)
    with pytest.raises(TypeError, match="Instruction"):
        store.write("instructions", [_failures(1)[0]])
    with pytest.raises(TypeError):
        store.write("instructions", [*_instructions(2), _failures(1)[0]])  # one bad row spoils the batch
    body = PreferenceTreeBody.model_validate(
        {"dimensions": [{"dimension": d, "subdimensions": [
            {"subdimension": s, "preferences": [{"preference": "p", "description": "d"}]} for s in "abc"]}
            for d in DIMENSIONS]}
    )
    with pytest.raises(TypeError):
        store.write("preference_trees", [body])  # the LLM body is not a stage row
    with pytest.raises(TypeError):
        store.write_failures([RMRow(input="i", chosen="c", rejected="r")])
    with pytest.raises(KeyError):
        store.write("no_such_stage", _instructions(1))
    assert store.files("instructions") == [] and store.files("preference_trees") == [] and store.files(FAILURES) == []


# -- atomic writes ----------------------------------------------------------------------------------------
WRITER = textwrap.dedent(
    """
    import os, sys
    import pyarrow as pa
    from facets.schemas import Failure, arrow_schema
    from facets.storage import Store

    store = Store(sys.argv[1], writer_id="victim")
    n = 4000
    blob = [os.urandom(3000).hex() for _ in range(n)]          # ~24 MB of incompressible text
    table = pa.table(
        {
            "stage": ["responses"] * n, "key": [f"k{i}" for i in range(n)], "reason": ["r"] * n,
            "raw_output": blob, "detail": [""] * n, "source": [""] * n, "row": list(range(n)),
            "created_at": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        },
        schema=arrow_schema(Failure),
    )
    print("ready", flush=True)
    while True:
        store.write_table(store.table_dir("failures"), table)
    """
)


def _hidden(directory: Path) -> list[Path]:
    return [p for p in directory.glob(".*") if p.is_file()]


def test_killed_writer_leaves_stage_readable(tmp_path):
    root = tmp_path / "data"
    stage_dir = root / "failures"
    src = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    caught_mid_write = False
    for _attempt in range(5):
        before = len(list(stage_dir.glob("*.parquet"))) if stage_dir.exists() else 0
        child = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, env=env)
        try:
            assert child.stdout.readline().strip() == b"ready"
            deadline = time.monotonic() + 60
            # let a file land, then kill while the next one is being written (a temporary file exists,
            # or, were writes not atomic, a second visible file is still growing)
            while time.monotonic() < deadline:
                done = len(list(stage_dir.glob("*.parquet"))) if stage_dir.exists() else 0
                if done > before and (_hidden(stage_dir) or done >= before + 2):
                    os.kill(child.pid, signal.SIGKILL)
                    break
                time.sleep(0.001)
            else:
                pytest.fail("the writer never produced a file")
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        # every visible file is complete: footer and all row groups readable
        for path in stage_dir.glob("*.parquet"):
            assert pq.read_table(path).num_rows == 4000, path.name
        if _hidden(stage_dir):
            caught_mid_write = True
            break
    assert caught_mid_write, "never caught the writer mid-file"

    visible = sorted(stage_dir.glob("*.parquet"))
    leftovers = _hidden(stage_dir)
    assert visible and leftovers
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers)
    with pytest.raises(Exception):  # the temporary file is a torn write
        pq.read_table(leftovers[0])

    # a hidden leftover named like a Parquet file is ignored as well
    (stage_dir / ".part-ghost-000000.parquet").write_bytes(b"PAR1 truncated")

    store = Store(root)
    assert store.files(FAILURES) == [str(p) for p in visible]
    assert store.count(FAILURES) == 4000 * len(visible)
    assert store.read(FAILURES, columns=["key"]).num_rows == 4000 * len(visible)
    with Catalog(store) as cat:
        assert cat.sql("SELECT count(*) FROM failures").fetchall() == [(4000 * len(visible),)]
        assert cat.sql("SELECT count(DISTINCT key) FROM failures").fetchall() == [(4000,)]
    # and the stage takes new writes
    store.write_failures(_failures(1))
    assert store.count(FAILURES) == 4000 * len(visible) + 1


# -- catalog ----------------------------------------------------------------------------------------------
def test_catalog_views_for_every_stage_even_empty(root):
    store = Store(root)
    store.write("instructions", _instructions(3))
    with Catalog(store) as cat:
        assert isinstance(cat, Catalog)
        views = {r[0] for r in cat.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert set(TABLE_MODELS) <= views
        assert set(STAGE_MODELS) | {FAILURES} == set(TABLE_MODELS)
        for table, model in TABLE_MODELS.items():
            rel = cat.sql(f"SELECT * FROM {table}")
            assert rel.columns == arrow_schema(model).names, table
        assert cat.sql("SELECT count(*) FROM instructions").fetchall() == [(3,)]
        assert cat.sql("SELECT count(*) FROM pairs").fetchall() == [(0,)]
        assert cat.sql("SELECT count(*) FROM failures").fetchall() == [(0,)]
        got = cat.sql("SELECT id FROM instructions WHERE metadata['n'] = '1'").fetchall()
        assert got == [(Instruction.from_text("instruction 1", "x").id,)]
        arrow = cat.sql("SELECT * FROM instructions ORDER BY id").to_arrow_table()
        assert arrow.num_rows == 3


def test_catalog_nested_columns_query(root):
    store = Store(root)
    store.write("preference_sets", _sets(3))
    with Catalog(store) as cat:
        rows = cat.sql(
            "SELECT fingerprint, p.dimension FROM (SELECT fingerprint, unnest(preferences) AS p FROM preference_sets) "
            "WHERE p.dimension = 'harmlessness' ORDER BY fingerprint"
        ).fetchall()
        assert rows == [("fp-0", "harmlessness"), ("fp-1", "harmlessness"), ("fp-2", "harmlessness")]


def test_catalog_refresh_picks_up_new_files(root):
    store = Store(root)
    with Catalog(store) as cat:
        assert cat.sql("SELECT count(*) FROM system_messages").fetchall() == [(0,)]
        other = Store(root)
        other.write("system_messages", [
            SystemMessage(instruction_id="n1-a", fingerprint="fp-a", set_index=0, text="You are kind.", model="m",
                          prompt_version="v1")
        ])
        assert cat.sql("SELECT count(*) FROM system_messages").fetchall() == [(0,)]  # a snapshot until refresh
        cat.refresh()
        assert cat.sql("SELECT fingerprint FROM system_messages").fetchall() == [("fp-a",)]
        store.write("system_messages", [
            SystemMessage(instruction_id="n1-b", fingerprint="fp-b", set_index=1, text="You are brief.", model="m",
                          prompt_version="v1")
        ])
        cat.refresh()
        assert cat.sql("SELECT fingerprint FROM system_messages ORDER BY 1").fetchall() == [("fp-a",), ("fp-b",)]


def test_missing_anti_join(root):
    store = Store(root)
    store.write("preference_sets", _sets(6))  # fp-0 .. fp-5
    store.write("instructions", _instructions(2))
    with Catalog(store) as cat:
        got = cat.missing("preference_sets", ["fp-1", "fp-9", "fp-5", "fp-7"])
        assert got.column_names == ["fingerprint"]
        assert sorted(got.column("fingerprint").to_pylist()) == ["fp-7", "fp-9"]
        assert cat.missing("preference_sets", []).num_rows == 0
        assert cat.missing("preference_sets", [f"fp-{i}" for i in range(6)]).num_rows == 0

        keys = pa.table({
            "instruction_id": ["n1-0000", "n1-0000", "n1-0009", "n1-0001"],
            "set_index": [0, 1, 0, 2],
            "fingerprint": ["fp-0", "fp-new", "fp-other", "fp-5"],
        })
        got = cat.missing("preference_sets", keys)
        assert got.column_names == ["instruction_id", "set_index", "fingerprint"]
        assert sorted(got.to_pylist(), key=lambda r: r["fingerprint"]) == [
            {"instruction_id": "n1-0000", "set_index": 1, "fingerprint": "fp-new"},
            {"instruction_id": "n1-0009", "set_index": 0, "fingerprint": "fp-other"},
        ]
        by_instruction = cat.missing("preference_sets", keys, on="instruction_id")
        assert by_instruction.to_pylist() == [{"instruction_id": "n1-0009", "set_index": 0, "fingerprint": "fp-other"}]

        # an empty stage: everything is missing
        assert sorted(cat.missing("responses", ["a", "b"]).column("fingerprint").to_pylist()) == ["a", "b"]
        # another key column
        ids = [r.id for r in _instructions(3)]
        assert cat.missing("instructions", ids, on="id").column("id").to_pylist() == [ids[2]]
        with pytest.raises(KeyError):
            cat.missing("no_such_table", ["x"])
        # the temporary registration does not leak
        with pytest.raises(Exception):
            cat.sql("SELECT * FROM _wanted").fetchall()


def _release(store: Store, version: str, name: str, rows: list, model, sub: str | None = None) -> str:
    directory = store.path("releases", version, name, *([sub] if sub else []))
    return store.write_table(directory, to_table(rows, model), label="data")


def _sft(prompt: str) -> SFTRow:
    return SFTRow(main_source="m", original_source="o", preference_set=_prefs(), system="You are kind.", prompt=prompt,
                  output="ok")


def _rm(prompt: str) -> RMRow:
    return RMRow(input="You are kind.\n" + prompt, chosen="yes", rejected="no")


def test_catalog_release_views(root):
    store = Store(root)
    _release(store, "v1", "sft", [_sft("a"), _sft("b")], SFTRow)
    _release(store, "v2", "sft", [_sft("c")], SFTRow)
    _release(store, "v2", "rm", [_rm(str(i)) for i in range(5)], RMRow, sub="train")
    _release(store, "v2", "rm", [_rm("t")], RMRow, sub="test")
    store.fs.pipe_file(store.path("releases", "v2", "README.md"), b"# card")
    store.fs.pipe_file(store.path("releases", "v2", "manifest.json"), b"{}")
    store.fs.pipe_file(store.path("releases", "v2", "sft", ".data-x.parquet.tmp"), b"partial")
    store.fs.pipe_file(store.path("releases", "LATEST"), b"v1\n")

    with Catalog(store) as cat:
        names = [(v, n) for v, n, _ in cat.release_tables()]
        assert names[-1] == ("v1", "sft")  # the LATEST version last, whatever its name sorts as
        assert sorted(names) == [("v1", "sft"), ("v2", "rm"), ("v2", "sft")]
        # LATEST says v1, so release_sft is v1 even though v2 sorts later
        assert cat.sql("SELECT prompt FROM release_sft ORDER BY 1").fetchall() == [("a",), ("b",)]
        assert cat.sql("SELECT prompt FROM release_v2_sft").fetchall() == [("c",)]
        assert cat.sql("SELECT count(*) FROM release_v1_sft").fetchall() == [(2,)]
        rel = cat.sql("SELECT * FROM release_sft")
        assert rel.columns == ["main_source", "original_source", "preference_set", "system", "prompt", "output"]
        first = cat.sql("SELECT preference_set FROM release_sft ORDER BY prompt LIMIT 1").fetchall()[0][0]
        assert [p["dimension"] for p in first] == list(DIMENSIONS)
        # the RM splits live in train/ and test/ below rm/: one view covers both
        assert cat.sql("SELECT count(*) FROM release_rm").fetchall() == [(6,)]
        assert cat.sql("SELECT count(*) FROM release_v2_rm").fetchall() == [(6,)]
        assert cat.sql("SELECT * FROM release_rm").columns == ["input", "chosen", "rejected"]

        # LATEST moves on: a refresh follows it
        store.fs.pipe_file(store.path("releases", "LATEST"), b"v2")
        cat.refresh()
        assert cat.sql("SELECT prompt FROM release_sft").fetchall() == [("c",)]


def test_catalog_release_names_that_are_not_identifiers(root):
    store = Store(root)
    _release(store, "2024.06.01+abc", "rm-extra", [_rm("x")], RMRow)
    _release(store, "2024.06.01+abc", "sft", [_sft("y")], SFTRow)
    with Catalog(store) as cat:  # one odd directory name must not take the whole catalog down
        assert cat.sql("SELECT count(*) FROM release_rm_extra").fetchall() == [(1,)]
        assert cat.sql("SELECT count(*) FROM release_2024_06_01_abc_rm_extra").fetchall() == [(1,)]
        assert cat.sql("SELECT prompt FROM release_sft").fetchall() == [("y",)]
        assert cat.sql("SELECT count(*) FROM instructions").fetchall() == [(0,)]


def test_catalog_release_without_latest_takes_newest_name(root):
    store = Store(root)
    _release(store, "2024-06-01-aaaa", "small", [_sft("old")], SFTRow)
    _release(store, "2024-07-01-bbbb", "small", [_sft("new")], SFTRow)
    with Catalog(store) as cat:
        assert cat.sql("SELECT prompt FROM release_small").fetchall() == [("new",)]
        assert cat.sql("SELECT prompt FROM release_2024_06_01_aaaa_small").fetchall() == [("old",)]


def test_catalog_with_no_releases_dir(root):
    store = Store(root)
    with Catalog(store) as cat:
        assert cat.release_tables() == []
        views = {r[0] for r in cat.sql("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        assert not any(v.startswith("release_") for v in views)


def test_catalog_on_memory_root_reads_through_fsspec(memory_root):
    store = Store(memory_root)
    assert not store.is_local
    store.write("pairs", [Pair(instruction_id="n1-a", fingerprint=f"fp{i}", chosen_index=i, rejected_index=i + 1)
                          for i in range(3)])
    _release(store, "v1", "dpo", [_rm("x")], RMRow)  # any release table will do
    with Catalog(store) as cat:
        assert cat.sql("SELECT sum(chosen_index) FROM pairs").fetchall() == [(3,)]
        assert cat.sql("SELECT count(*) FROM release_dpo").fetchall() == [(1,)]
        assert cat.missing("pairs", ["fp1", "fp7"]).column("fingerprint").to_pylist() == ["fp7"]
        # the views read memory:// paths (nothing was copied to local disk)
        definition = cat.sql("SELECT sql FROM duckdb_views() WHERE view_name = 'pairs'").fetchall()[0][0]
        assert f"'{memory_root}/stages/pairs/part-" in definition.replace("memory:///", "memory://")
