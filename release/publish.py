"""Publish a release: SFT, small, DPO, ORPO and RM under `releases/<version>/`, with card, pictures, manifest.

`publish_release` takes the rows of the current build (`expected`: stage, instruction_id, set_index,
fingerprint) and joins them in DuckDB against the stage tables, which may also hold rows of earlier
builds (other fingerprints) and rows written twice by a retried shard: exactly one row per expected key
is taken, the rest ignored and counted. An instruction is released only when its pair and all its sets,
system messages and responses are present (docs/ARCHITECTURE.md, decision 8); any other is left out and counted.

The datasets are built as Arrow in SQL and streamed to Parquet in fixed row groups, sorted by instruction
id and set index, so their bytes depend on their content only. The version is a hash of those bytes
(decision 10): publishing identical content again creates nothing and leaves `releases/LATEST` alone
(content equal to an older release points `LATEST` back at it, still without a new folder). A no-op
rebuild does not even rewrite the datasets: when the latest release was published from the same
selection (the build's fingerprints, its complete instructions, the split parameters), it is the answer.
A new release is staged in full, then moved into place in one rename (one PUT per file on object stores,
`manifest.json` last); `releases/LATEST` is written after it.

On an object store, DuckDB reads a local copy of the stage files, each downloaded once (storage/mirror.py).
Memory: DuckDB works within `MEMORY_MB` and spills the rest to the data dir's disk, so the release of the
paper's 65,653 instructions takes no more memory than that of a few thousand.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from datetime import datetime, timezone

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from facets.schemas import PreferencePairRow, RMRow, SFTRow, arrow_schema
from facets.schemas.stages import STAGES
from facets.storage import Catalog, Store
from facets.storage.mirror import local_tables
from facets.storage.scratch import Scratch, open_scratch, sweep
from facets.release.data_report import REPORT_DIR, data_report, report_markdown, write_report
from facets.release.card import CardFacts, format_cost, redact, render_card, total_cost, total_tokens
from facets.release.sunburst import sunburst_html, sunburst_nodes, sunburst_png

SUBSETS = ("sft", "small", "dpo", "orpo", "rm")
SET_STAGES = tuple(stage.name for stage in STAGES if stage.rows == "per_set")
INSTRUCTION_STAGES = tuple(stage.name for stage in STAGES if stage.rows != "per_set")  # one row per instruction
EXPECTED_SCHEMA = pa.schema([
    ("stage", pa.string()), ("instruction_id", pa.string()), ("set_index", pa.int64()), ("fingerprint", pa.string()),
])
ROW_GROUP = 5_000
# DuckDB's memory for a release: the paper's 65,653 instructions publish within it (37 s on 2 cores)
MEMORY_MB = 512
log = logging.getLogger(__name__)
# Part of the selection digest: bump when the SQL or the layouts change what a release holds.
RELEASE_FORMAT = "release-1"
SCHEMAS = {"sft": SFTRow, "small": SFTRow, "dpo": PreferencePairRow, "orpo": PreferencePairRow, "rm": RMRow}
PARQUET_OPTIONS = {"compression": "zstd"}
LATEST = "LATEST"
MANIFEST = "manifest.json"


class ReleaseError(ValueError):
    """The build's rows cannot make a release (nothing complete, contradictory `expected`, broken target)."""


class ReleasePushError(RuntimeError):
    """Pushing a release to the hub failed; the message is one line."""


class ReleaseInfo(BaseModel):
    """What the card needs that the data does not say."""

    models: dict[str, str] = Field(default_factory=dict)            # stage -> model
    prompt_versions: dict[str, str] = Field(default_factory=dict)   # stage -> template version
    usage: dict[str, dict] = Field(default_factory=dict)            # stage -> gateway usage summary
    build_seconds: float = 0.0
    seed: int = 0
    config: dict = Field(default_factory=dict)                      # the build config, for the record


class Release(BaseModel):
    version: str
    path: str                     # the release folder: a local path or an fsspec URI
    counts: dict[str, int]        # instructions, sft, small, dpo, orpo, rm_train, rm_test, left_out
    is_new: bool                  # False: a release with this content already existed
    latest_changed: bool = False  # releases/LATEST now names this version and did not before
    left_out: dict[str, int] = Field(default_factory=dict)  # reason -> instructions of the build not released


def rm_test_size(pairs: int, fraction: float) -> int:
    """Pairs held out for the RM test split: round(fraction * pairs), at least 1 and at most pairs - 1.

    Two pairs or more always give both splits, so a tiny build has the same layout as a full one; a
    single pair goes to train (and the test file is empty). `fraction` 0 means no test rows.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {fraction}")
    if pairs < 2 or fraction == 0:
        return 0
    return min(pairs - 1, max(1, round(fraction * pairs)))


# -- selection in DuckDB --------------------------------------------------------------------------------
def _expected_table(expected: pa.Table) -> pa.Table:
    missing = [c for c in EXPECTED_SCHEMA.names if c not in expected.column_names]
    if missing:
        raise ReleaseError(f"expected needs columns {EXPECTED_SCHEMA.names}; missing {missing}")
    table = expected.select(EXPECTED_SCHEMA.names).cast(EXPECTED_SCHEMA)
    stages = {s for s in table.column("stage").unique().to_pylist()}
    unknown = stages - set(SET_STAGES) - set(INSTRUCTION_STAGES)
    if unknown:
        raise ReleaseError(f"expected names unknown stages {sorted(map(str, unknown))}; "
                           f"known: {[*SET_STAGES, *INSTRUCTION_STAGES]}")
    if table.num_rows and table.combine_chunks().drop_null().num_rows != table.num_rows:
        raise ReleaseError("expected holds null values")
    return table


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _scans(store: Store) -> dict[str, str]:
    """Each stage's rows with their file index and row number: a row's address, to fetch its texts once.
    The files are listed once, so an index names the same file in every query of the release (a file
    another writer adds meanwhile is in none of them); an index, not the path, keeps addresses small."""
    scans = {}
    for stage in (*SET_STAGES, *INSTRUCTION_STAGES):
        files = store.files(stage)
        if not files:
            scans[stage] = f"(SELECT *, NULL::UBIGINT AS file_index, NULL::BIGINT AS file_row_number FROM {stage})"
            continue
        listing = ", ".join(_quote(_location(store, f)) for f in files)
        scans[stage] = f"read_parquet([{listing}], union_by_name=true, file_row_number=true)"
    return scans


def _select(con: duckdb.DuckDBPyConnection, scans: dict[str, str]) -> None:
    """Temporary tables: the address of one row per expected key (_m_*), instructions, and the status of
    every instruction of the build (reason NULL: complete)."""
    clash = con.sql("""
        SELECT stage, instruction_id, set_index FROM _expected GROUP BY ALL
        HAVING count(DISTINCT fingerprint) > 1 LIMIT 1""").fetchall()
    if clash:
        raise ReleaseError(f"expected names two fingerprints for one row: {clash[0]}")
    for stage, scan in scans.items():
        per_set = stage in SET_STAGES
        set_index = "t.set_index" if per_set else "-1"
        on = "t.instruction_id = e.instruction_id AND t.fingerprint = e.fingerprint"
        on += " AND t.set_index = e.set_index" if per_set else ""
        extra = ", t.chosen_index, t.rejected_index" if stage == "pairs" else ""
        # duplicates (a retried shard) are identical but for created_at: the earliest is taken
        con.execute(f"""
            CREATE OR REPLACE TEMP TABLE _m_{stage} AS
            SELECT t.instruction_id, {set_index} AS set_index, t.file_index AS _file, t.file_row_number AS _row{extra},
                   row_number() OVER (PARTITION BY t.instruction_id, {set_index}
                                      ORDER BY t.created_at, t.file_index, t.file_row_number) AS _rn
            FROM {scan} t
            JOIN (SELECT DISTINCT instruction_id, set_index, fingerprint FROM _expected WHERE stage = '{stage}') e
              ON {on}""")
    con.execute("""
        CREATE OR REPLACE TEMP TABLE _instr AS
        SELECT id AS instruction_id, text, main_source, original_source FROM instructions
        WHERE id IN (SELECT DISTINCT instruction_id FROM _expected)
        QUALIFY row_number() OVER (PARTITION BY id ORDER BY main_source, original_source, text) = 1""")
    set_stages = ", ".join(f"'{s}'" for s in SET_STAGES)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _status AS
        WITH ids AS (SELECT DISTINCT instruction_id FROM _expected),
        keys AS (SELECT DISTINCT instruction_id, set_index FROM _expected WHERE stage IN ({set_stages})),
        per_set AS (
            SELECT k.instruction_id, k.set_index,
                   s.instruction_id IS NOT NULL AS has_set,
                   m.instruction_id IS NOT NULL AS has_msg,
                   r.instruction_id IS NOT NULL AS has_resp
            FROM keys k
            LEFT JOIN _m_preference_sets s ON s._rn = 1 AND s.instruction_id = k.instruction_id AND s.set_index = k.set_index
            LEFT JOIN _m_system_messages m ON m._rn = 1 AND m.instruction_id = k.instruction_id AND m.set_index = k.set_index
            LEFT JOIN _m_responses r ON r._rn = 1 AND r.instruction_id = k.instruction_id AND r.set_index = k.set_index),
        sets AS (
            SELECT instruction_id, bool_and(has_set) AS all_sets, bool_and(has_msg) AS all_msgs,
                   bool_and(has_resp) AS all_resp, list(set_index) AS indices
            FROM per_set GROUP BY 1),
        trees AS (
            SELECT e.instruction_id, bool_or(t.instruction_id IS NOT NULL) AS has_tree
            FROM (SELECT DISTINCT instruction_id FROM _expected WHERE stage = 'preference_trees') e
            LEFT JOIN _m_preference_trees t ON t._rn = 1 AND t.instruction_id = e.instruction_id
            GROUP BY 1)
        SELECT i.instruction_id, p.chosen_index, p.rejected_index,
               CASE
                 WHEN ins.instruction_id IS NULL THEN 'instruction missing'
                 WHEN tr.has_tree = false THEN 'preference tree missing'
                 WHEN s.instruction_id IS NULL THEN 'no preference sets in the build'
                 WHEN NOT s.all_sets THEN 'preference set missing'
                 WHEN NOT s.all_msgs THEN 'system message missing'
                 WHEN NOT s.all_resp THEN 'response missing'
                 WHEN p.instruction_id IS NULL THEN 'pair missing'
                 WHEN NOT list_contains(s.indices, p.chosen_index) OR NOT list_contains(s.indices, p.rejected_index)
                   THEN 'pair names a set outside the build'
               END AS reason
        FROM ids i
        LEFT JOIN _instr ins USING (instruction_id)
        LEFT JOIN sets s USING (instruction_id)
        LEFT JOIN trees tr USING (instruction_id)
        LEFT JOIN _m_pairs p ON p._rn = 1 AND p.instruction_id = i.instruction_id""")


def _selection_digest(con: duckdb.DuckDBPyConnection, seed: int, test_fraction: float) -> str:
    """What decides the datasets' content, cheaper than the content itself: the complete instructions' rows
    of the build by fingerprint (a fingerprint fixes a row's content: docs/ARCHITECTURE.md, principle 1),
    their sources, the split parameters and the layout version. Equal digests give equal datasets, so a no-op rebuild
    finds its release without rewriting it. Each part is hashed as its lines stream out of a sort, which
    DuckDB spills: one string of every line would not (at 65k instructions, more than a 256 MB limit)."""
    rows = _lines_sha256(con, """
        SELECT e.stage || '|' || e.instruction_id || '|' || e.set_index || '|' || e.fingerprint
        FROM (SELECT DISTINCT stage, instruction_id, set_index, fingerprint FROM _expected) e
        JOIN _status s ON s.instruction_id = e.instruction_id AND s.reason IS NULL
        ORDER BY e.stage, e.instruction_id, e.set_index""")
    instructions = _lines_sha256(con, """
        SELECT i.instruction_id || '|' || i.main_source || '|' || i.original_source || '|' || sha256(i.text)
        FROM _instr i JOIN _status s ON s.instruction_id = i.instruction_id AND s.reason IS NULL
        ORDER BY i.instruction_id""")
    payload = json.dumps([RELEASE_FORMAT, int(seed), float(test_fraction), rows, instructions])
    return hashlib.sha256(payload.encode()).hexdigest()


def _lines_sha256(con: duckdb.DuckDBPyConnection, query: str) -> str:
    """sha256 (hex) of the query's one string column, its rows joined by newlines."""
    digest, first = hashlib.sha256(), True
    for batch in con.sql(query).to_arrow_reader(ROW_GROUP):
        lines = batch.column(0).to_pylist()
        if lines:
            digest.update(("" if first else "\n").encode() + "\n".join(lines).encode())
            first = False
    return digest.hexdigest()


def _build_rows(con: duckdb.DuckDBPyConnection, scans: dict[str, str]) -> None:
    """_rows (the only table holding texts; DuckDB spills it to disk) and the _pairrows view over it."""
    set_stages = ", ".join(f"'{s}'" for s in SET_STAGES)

    def fetch(stage: str, column: str, alias: str) -> str:
        return f"""(SELECT m.instruction_id, m.set_index, t.{column} AS {alias}
                    FROM _m_{stage} m JOIN {scans[stage]} t ON t.file_index = m._file AND t.file_row_number = m._row
                    WHERE m._rn = 1)"""

    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _rows AS
        SELECT k.instruction_id, k.set_index, ins.main_source, ins.original_source,
               s.preference_set, m.system, ins.text AS prompt, r.output
        FROM (SELECT DISTINCT instruction_id, set_index FROM _expected WHERE stage IN ({set_stages})) k
        JOIN _status st ON st.instruction_id = k.instruction_id AND st.reason IS NULL
        JOIN _instr ins ON ins.instruction_id = k.instruction_id
        JOIN {fetch("preference_sets", "preferences", "preference_set")} s
          ON s.instruction_id = k.instruction_id AND s.set_index = k.set_index
        JOIN {fetch("system_messages", "text", "system")} m ON m.instruction_id = k.instruction_id AND m.set_index = k.set_index
        JOIN {fetch("responses", "text", "output")} r ON r.instruction_id = k.instruction_id AND r.set_index = k.set_index""")
    con.execute("""
        CREATE OR REPLACE TEMP VIEW _pairrows AS
        SELECT st.instruction_id, c.main_source, c.original_source, c.system, c.prompt,
               c.output AS chosen, r.output AS rejected
        FROM _status st
        JOIN _rows c ON c.instruction_id = st.instruction_id AND c.set_index = st.chosen_index
        JOIN _rows r ON r.instruction_id = st.instruction_id AND r.set_index = st.rejected_index
        WHERE st.reason IS NULL""")


def _subset_queries(seed: int, test_rows: int) -> dict[str, dict[str, str]]:
    """subset -> split -> SQL, each sorted by instruction id (and set index)."""
    sft_cols = "main_source, original_source, preference_set, system, prompt, output"
    chat = "[{{'content': prompt, 'role': 'user'}}, {{'content': {0}, 'role': 'assistant'}}]"
    pair_cols = (f"main_source, original_source, system, prompt, {chat.format('chosen')} AS chosen, "
                 f"{chat.format('rejected')} AS rejected")
    pair_query = f"SELECT {pair_cols} FROM _pairrows ORDER BY instruction_id"
    # the held-out pairs: the first `test_rows` in an order seeded by `seed`; md5 is stable across DuckDB versions
    held_out = (f"(SELECT instruction_id FROM _status WHERE reason IS NULL "
                f"ORDER BY md5('{int(seed)}:' || instruction_id), instruction_id LIMIT {int(test_rows)})")
    rm = "SELECT system || chr(10) || prompt AS input, chosen, rejected FROM _pairrows"
    return {
        "sft": {"train": f"SELECT {sft_cols} FROM _rows ORDER BY instruction_id, set_index"},
        "small": {"train": f"""SELECT {', '.join('r.' + c for c in sft_cols.split(', '))} FROM _rows r
                              JOIN _status st ON st.instruction_id = r.instruction_id AND st.chosen_index = r.set_index
                              WHERE st.reason IS NULL ORDER BY r.instruction_id"""},
        "dpo": {"train": pair_query},
        "orpo": {"train": pair_query},
        "rm": {
            "train": f"{rm} WHERE instruction_id NOT IN {held_out} ORDER BY instruction_id",
            "test": f"{rm} WHERE instruction_id IN {held_out} ORDER BY instruction_id",
        },
    }


def _write_parquet(con: duckdb.DuckDBPyConnection, query: str, schema: pa.Schema, path: str) -> int:
    """Stream a query to one Parquet file in row groups of exactly ROW_GROUP rows (the last one shorter)."""
    reader = con.sql(query).to_arrow_reader(ROW_GROUP)
    rows = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    with pq.ParquetWriter(path, schema, **PARQUET_OPTIONS) as writer:
        for batch in reader:
            if not batch.num_rows:
                continue
            pending.append(pa.Table.from_batches([batch]).rename_columns(schema.names).cast(schema))
            pending_rows += batch.num_rows
            while pending_rows >= ROW_GROUP:
                table = pa.concat_tables(pending)
                writer.write_table(table.slice(0, ROW_GROUP), row_group_size=ROW_GROUP)
                rest = table.slice(ROW_GROUP)
                pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
                rows += ROW_GROUP
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP)
            rows += pending_rows
    return rows


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_entry(path: str, rows: int | None = None) -> dict:
    entry = {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}
    if rows is not None:
        entry["rows"] = rows
    return entry


def data_file(subset: str, split: str) -> str:
    """Relative path of a subset's split: names `datasets` reads as the split (`train-…`, `test-…`)."""
    return f"{subset}/{split}-00000-of-00001.parquet"


# -- publishing ---------------------------------------------------------------------------------------
def _location(store: Store, path: str) -> str:
    return path if store.is_local else store.fs.unstrip_protocol(path)


def _read_latest(store: Store) -> str | None:
    path = store.path("releases", LATEST)
    return store.fs.cat_file(path).decode().strip() if store.fs.exists(path) else None


def _write_latest(store: Store, version: str) -> None:
    store.write_text(f"{version}\n", "releases", LATEST)


def _current_release(store: Store, selection: str) -> tuple[str, dict] | None:
    """(version, manifest) of the latest release when it was published from the same selection."""
    version = _read_latest(store)
    if not version:
        return None
    path = store.path("releases", version, MANIFEST)
    try:
        manifest = json.loads(store.fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
    if manifest.get("selection") != selection or manifest.get("version") != version:
        return None
    if not all(store.fs.exists(store.path("releases", version, name)) for name in manifest.get("files", {})):
        return None
    return version, manifest


def _commit(store: Store, staging: str, target: str, files: list[str]) -> bool:
    """Move the staged release into place; False when another publisher put the same version there first."""
    if store.is_local:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.rename(staging, target)
        except OSError:
            if os.path.exists(f"{target}/{MANIFEST}"):
                return False
            raise
        return True
    for name in [f for f in files if f != MANIFEST] + [MANIFEST]:  # the manifest last: it marks the release whole
        store.fs.put_file(f"{staging}/{name}", f"{target}/{name}")
    return True


def _scalar(con: duckdb.DuckDBPyConnection, query: str) -> int:
    return int(con.sql(query).fetchall()[0][0])


def _stage_stats(con: duckdb.DuckDBPyConnection, stages: list[str]) -> list[dict]:
    stats = []
    for stage in stages:
        expected = _scalar(con, f"SELECT count(*) FROM (SELECT DISTINCT instruction_id, set_index FROM _expected WHERE stage = '{stage}')")
        matched, found = con.sql(f"SELECT count(*), count(*) FILTER (WHERE _rn = 1) FROM _m_{stage}").fetchall()[0]
        in_table = _scalar(con, f"SELECT count(*) FROM {stage}")
        stats.append({"stage": stage, "expected": expected, "found": int(found),
                      "stale": in_table - int(matched), "duplicates": int(matched) - int(found)})
    return stats


def _write_datasets(con: duckdb.DuckDBPyConnection, staging: str, seed: int, test_rows: int
                    ) -> tuple[dict[str, dict[str, int]], dict[str, dict]]:
    """Every subset's splits as Parquet under `staging`: (subset -> split -> rows, file -> manifest entry)."""
    splits: dict[str, dict[str, int]] = {}
    entries: dict[str, dict] = {}
    for subset, parts in _subset_queries(seed, test_rows).items():
        os.makedirs(f"{staging}/{subset}", exist_ok=True)
        for split, query in parts.items():
            name = data_file(subset, split)
            if subset == "orpo":  # the same rows as DPO (as published): copied, not computed twice
                shutil.copyfile(f"{staging}/{data_file('dpo', split)}", f"{staging}/{name}")
                rows = splits["dpo"][split]
            else:
                rows = _write_parquet(con, query, arrow_schema(SCHEMAS[subset]), f"{staging}/{name}")
            splits.setdefault(subset, {})[split] = rows
            entries[name] = _file_entry(f"{staging}/{name}", rows)
    return splits, entries


def _write_extras(con: duckdb.DuckDBPyConnection, staging: str, facts: CardFacts) -> dict[str, dict]:
    """Data report, card, sunburst HTML and PNG into `staging`; their manifest entries."""
    report = dataclasses.replace(data_report(staging, seed=facts.seed), release=facts.version)
    files = write_report(staging, report)
    facts.data_report = report_markdown(report, folder=f"{REPORT_DIR}/")
    title = f"Multifaceted Collection {facts.version}: dimension, subdimension, preference"
    extras = {
        "README.md": render_card(facts).encode("utf-8"),
        "sunburst.html": sunburst_html(facts.nodes, title).encode("utf-8"),
        "sunburst.png": sunburst_png(facts.nodes, title),
    }
    entries = {}
    for name, data in extras.items():
        with open(f"{staging}/{name}", "wb") as handle:
            handle.write(data)
        entries[name] = _file_entry(f"{staging}/{name}")
    for path in files.values():
        entries[os.path.relpath(path, staging)] = _file_entry(path)
    return entries


def _card_facts(con: duckdb.DuckDBPyConnection, info: ReleaseInfo, *, version: str, content_hash: str,
                splits: dict[str, dict[str, int]], instructions: int, left_out: dict[str, int], seed: int,
                test_fraction: float) -> CardFacts:
    stages = [s for s in (*SET_STAGES, *INSTRUCTION_STAGES)
              if _scalar(con, f"SELECT count(*) FROM _expected WHERE stage = '{s}'")]
    sources = [(s, int(i), int(r)) for s, i, r in con.sql(
        "SELECT main_source, count(DISTINCT instruction_id), count(*) FROM _rows GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()]
    failures = [(s, r, int(n)) for s, r, n in con.sql(
        "SELECT stage, reason, count(*) AS n FROM failures GROUP BY ALL ORDER BY stage, n DESC, reason").fetchall()]
    return CardFacts(
        version=version, content_hash=content_hash, splits=splits, instructions=instructions, sources=sources,
        stages=_stage_stats(con, stages), left_out=left_out, failures=failures, models=info.models,
        prompt_versions=info.prompt_versions, usage=info.usage, build_seconds=info.build_seconds,
        seed=info.seed, split_seed=seed, test_fraction=test_fraction, config=info.config,
        nodes=sunburst_nodes(con, "_rows"))


def _scratch(store: Store, kind: str, held: list[Scratch]) -> str:
    """A fresh folder for work in progress (storage/scratch.py): on the data dir's own disk when local (a
    staged release then moves into place in one rename), locked while this process works in it, so that
    what a killed publisher leaves is swept; `held` releases it."""
    held.append(scratch := open_scratch(store, kind))
    return scratch.path


def publish_release(store: Store, expected: pa.Table, info: ReleaseInfo, *, seed: int = 0,
                    test_fraction: float = 0.005, memory_mb: int | None = MEMORY_MB) -> Release:
    """Publish the build's rows as `releases/<version>/` (see the module docstring); returns what it did.

    `seed` draws the RM test split (`test_fraction` of the pairs, see `rm_test_size`). `memory_mb` bounds
    DuckDB, which spills to the data dir beyond it, on one thread (DuckDB needs more memory per thread to
    spill these joins of long texts): the release's memory does not grow with the collection. Should a
    collection still not fit, the release is made again with twice the memory, up to 8 times
    (None: no limit, DuckDB's default of most of the RAM, on every core).
    """
    expected = _expected_table(expected)
    rm_test_size(1, test_fraction)  # validates the fraction before any work
    sweep(store)  # what killed publishers left: staged releases, DuckDB spill
    limits = [None] if memory_mb is None else [memory_mb * 2**i for i in range(4)]
    for limit in limits:
        try:
            return _publish(store, expected, info, seed, test_fraction, limit)
        except (duckdb.OutOfMemoryException, OSError) as error:
            if "Out of Memory" not in str(error) or limit == limits[-1]:
                raise
            log.warning("the release needs more than DuckDB's %d MB; making it again with %d MB", limit, 2 * limit)
    raise AssertionError("unreachable")


def _publish(store: Store, expected: pa.Table, info: ReleaseInfo, seed: int, test_fraction: float,
             memory_mb: int | None) -> Release:
    started = time.monotonic()
    scratch: list[Scratch] = []
    try:
        tables = local_tables(store)  # an object store's stage files, copied once: DuckDB reads them at disk speed
        with Catalog(tables) as catalog:
            con = catalog.con
            con.execute("SET temp_directory = " + _quote(_scratch(store, "spill", scratch)))
            if memory_mb is not None:
                con.execute(f"SET memory_limit = '{int(memory_mb)}MB'")
                con.execute("SET threads = 1")
            con.register("_expected", expected)
            scans = _scans(tables)
            _select(con, scans)
            selection = _selection_digest(con, seed, test_fraction)
            current = _current_release(store, selection)
            left_out = dict(con.sql("SELECT reason, count(*) FROM _status WHERE reason IS NOT NULL GROUP BY 1 ORDER BY 1").fetchall())
            pairs = _scalar(con, "SELECT count(*) FROM _status WHERE reason IS NULL")
            if pairs == 0:
                total = _scalar(con, "SELECT count(*) FROM _status")
                raise ReleaseError(f"nothing to publish: none of the build's {total} instructions has all its rows"
                                   + (f" ({', '.join(f'{r}: {n}' for r, n in left_out.items())})" if left_out else ""))
            if current is not None:  # the latest release already holds exactly these rows
                counts = {**current[1]["counts"], "left_out": sum(left_out.values())}
                return Release(version=current[0], path=_location(store, store.path("releases", current[0])),
                               counts=counts, is_new=False, latest_changed=False, left_out=left_out)
            _build_rows(con, scans)
            staging = _scratch(store, "release", scratch)
            splits, entries = _write_datasets(con, staging, seed, rm_test_size(pairs, test_fraction))
            content_hash = hashlib.sha256("".join(f"{n}\t{e['sha256']}\n" for n, e in sorted(entries.items())).encode()).hexdigest()
            version = content_hash[:16]
            target = store.path("releases", version)
            counts = {"instructions": pairs, **{s: p["train"] for s, p in splits.items() if s != "rm"},
                      "rm_train": splits["rm"]["train"], "rm_test": splits["rm"]["test"], "left_out": sum(left_out.values())}
            is_new = False
            if not store.fs.exists(f"{target}/{MANIFEST}"):
                if store.is_local and store.fs.exists(target):
                    raise ReleaseError(f"{target} exists without {MANIFEST} (an interrupted or hand-made release); "
                                       "remove it and publish again")
                facts = _card_facts(con, info, version=version, content_hash=content_hash, splits=splits,
                                    instructions=pairs, left_out=left_out, seed=seed, test_fraction=test_fraction)
                entries.update(_write_extras(con, staging, facts))
                cost = total_cost(info.usage)
                manifest = {
                    "version": version,
                    "content_hash": content_hash,
                    "selection": selection,
                    "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "counts": counts,
                    "splits": splits,
                    "left_out": left_out,
                    "files": dict(sorted(entries.items())),
                    "models": info.models,
                    "prompt_versions": info.prompt_versions,
                    "usage": info.usage,
                    "tokens": total_tokens(info.usage),
                    "cost_usd": cost,
                    "cost": format_cost(cost),
                    "build_seconds": info.build_seconds,
                    "publish_seconds": round(time.monotonic() - started, 3),
                    "seed": info.seed,
                    "rm_split": {"seed": seed, "test_fraction": test_fraction},
                    "config": redact(info.config),
                }
                with open(f"{staging}/{MANIFEST}", "wb") as handle:
                    handle.write(json.dumps(manifest, indent=2, default=str).encode("utf-8") + b"\n")
                is_new = _commit(store, staging, target, [*entries, MANIFEST])
    finally:
        for held in scratch:
            held.close()
        if store.is_local:
            try:
                os.rmdir(store.path(".staging"))  # only when empty: another publisher may be at work
            except OSError:
                pass
    latest_changed = _read_latest(store) != version
    if latest_changed:
        _write_latest(store, version)
    return Release(version=version, path=_location(store, target), counts=counts, is_new=is_new,
                   latest_changed=latest_changed, left_out=left_out)


# -- the hub ---------------------------------------------------------------------------------------------
def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def push_release(release_dir: str | os.PathLike[str], repo_id: str, token: str | None = None,
                 *, private: bool | None = None) -> list[str]:
    """Push each subset of a release (local path or fsspec URI) to the hub as a config of `repo_id` through
    `datasets` (`load_dataset("parquet", data_dir=...)`, then `push_to_hub(repo_id, config_name=...)`), then
    the pictures, the manifest and the card (keeping the `dataset_info` that `push_to_hub` wrote).
    Returns the configs pushed; any failure raises ReleasePushError with a one-line message."""
    import datasets
    import fsspec
    from huggingface_hub import DatasetCard, HfApi

    root = str(release_dir).rstrip("/")
    fs, base = fsspec.core.url_to_fs(root)
    if not fs.exists(f"{base}/{MANIFEST}"):
        raise ReleasePushError(f"{root} is not a release (no {MANIFEST})")
    manifest = json.loads(fs.cat_file(f"{base}/{MANIFEST}"))
    names = list(manifest.get("splits") or SUBSETS)
    remote = {} if "://" not in root else {"storage_options": fs.storage_options}
    pushed: list[str] = []
    what = f"load {names[0]}"
    try:
        with tempfile.TemporaryDirectory(prefix="facets-push-") as cache:
            for name in names:
                what = f"load {name}"
                dataset = datasets.load_dataset("parquet", data_dir=f"{root}/{name}", cache_dir=cache, **remote)
                what = f"push {name}"
                dataset.push_to_hub(repo_id, config_name=name, token=token, private=private)
                pushed.append(name)
        api = HfApi(token=token)
        for extra in ("sunburst.html", "sunburst.png", MANIFEST):
            if fs.exists(f"{base}/{extra}"):
                what = f"upload {extra}"
                api.upload_file(path_or_fileobj=fs.cat_file(f"{base}/{extra}"), path_in_repo=extra, repo_id=repo_id,
                                repo_type="dataset", commit_message=f"Add {extra}")
        if fs.exists(f"{base}/README.md"):
            what = "upload README.md"
            ours = DatasetCard(fs.cat_file(f"{base}/README.md").decode("utf-8"))
            theirs = DatasetCard.load(repo_id, repo_type="dataset", token=token).data.to_dict()
            merged = {**theirs, **ours.data.to_dict()}
            if "dataset_info" in theirs:
                merged["dataset_info"] = theirs["dataset_info"]
            DatasetCard(f"---\n{_yaml(merged)}---\n{ours.text}").push_to_hub(
                repo_id, repo_type="dataset", token=token, commit_message="Update dataset card")
    except Exception as error:  # noqa: BLE001 - one clear line for the CLI; the cause stays chained
        done = f" (already pushed: {', '.join(pushed)})" if pushed else ""
        raise ReleasePushError(f"could not {what} of release {root} to {repo_id}{done}: {_one_line(error)}") from error
    return pushed


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
