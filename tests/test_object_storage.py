"""An s3:// data dir: the build flow writes its stages, journal and release to a real S3-compatible
server (moto's, started on loopback), DuckDB queries them there, `datasets` loads the release from it,
and a rebuild asks nothing. Requests are counted at the servers."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from facets.flows.build import build_collection
from facets.simulator.server import run_simulator
from facets.schemas.config import BuildConfig, EndpointConfig, RateLimits
from facets.storage import Catalog, Store
from facets.testing.s3_server import S3Server, apply_env, restore_env
from facets.storage.store import dataset_arguments

NECTAR = Path(__file__).parent / "data" / "sources" / "nectar" / "data.jsonl"


@pytest.fixture(scope="module")
def s3(prefect_server):
    with S3Server() as server:
        previous = apply_env(server)
        try:
            yield server
        finally:
            restore_env(previous)


def test_a_build_on_object_storage_publishes_a_loadable_release_and_a_rebuild_asks_nothing(s3, tmp_path):
    import datasets

    bucket = s3.make_bucket("facets-build")
    data_dir = f"{bucket}/data"
    with run_simulator(seed=2) as sim:
        endpoint = EndpointConfig(base_url=sim.base_url, api_key="sk-test", model="facets-sim",
                                  limits=RateLimits(rpm=60_000))
        config = BuildConfig(sources=[f"nectar={NECTAR}"], limit=4, shard_size=2, data_dir=data_dir,
                             endpoint=endpoint, publish=True)
        first = asyncio.run(build_collection(config))
        before = sim.stats()["requests"]
        second = asyncio.run(build_collection(config))
        again = sim.stats()["requests"] - before
    assert first["accepted"] == 4 and first["release"]["is_new"]
    assert first["release"]["path"].startswith("s3://facets-build/data/releases/")
    assert again == 0 and not second["release"]["is_new"]
    assert s3.requests()["PUT"] > 0, "the files went to the object store"
    assert not (tmp_path / "data").exists()

    store = Store(data_dir)
    with Catalog(store) as catalog:
        ((pairs,),) = catalog.sql("select count(*) from pairs").fetchall()
        ((sft,),) = catalog.sql("select count(*) from release_sft").fetchall()
    assert (pairs, sft) == (4, 12)
    sft_rows = datasets.load_dataset("parquet", split="train",
                                     **dataset_arguments(f"{first['release']['path']}/sft"))
    assert len(sft_rows) == 12 and len(sft_rows[0]["preference_set"]) == 4


def test_a_release_reads_a_local_copy_of_the_stage_files_and_downloads_each_once(s3, tmp_path, monkeypatch):
    import duckdb
    import pyarrow as pa

    from facets.storage.mirror import local_tables

    monkeypatch.setenv("FACETS_CACHE_DIR", str(tmp_path / "cache"))
    store = Store(f"{s3.make_bucket('facets-mirror')}/data")
    first = store.write_table(store.table_dir("pairs"), pa.table({"x": [1]}))
    second = store.write_table(store.table_dir("pairs"), pa.table({"x": [2]}))

    def parquet_gets() -> int:
        return sum(1 for method, path, _ in s3.log() if method == "GET" and path.split("?")[0].endswith(".parquet"))

    before = parquet_gets()
    copy = local_tables(store)
    assert copy.is_local and str(tmp_path / "cache") in copy.root
    assert duckdb.sql(f"select sum(x) from read_parquet({copy.files('pairs')})").fetchall() == [(3,)]
    assert parquet_gets() - before == 2
    assert local_tables(store).files("pairs") == copy.files("pairs") and parquet_gets() - before == 2, \
        "a file already copied is not downloaded again"
    store.fs.rm(first)
    third = store.write_table(store.table_dir("pairs"), pa.table({"x": [4]}))
    names = [path.rsplit("/", 1)[-1] for path in local_tables(store).files("pairs")]
    assert names == sorted(path.rsplit("/", 1)[-1] for path in (second, third)), "the copy holds what the store lists"
    assert parquet_gets() - before == 3


def test_a_journal_reads_a_live_file_to_its_end_then_the_segment_it_is_sealed_into(s3):
    """On one machine a reader indexes a writer's live file as it grows; once the writer seals it into a
    segment on S3 there is nothing past what was read, and S3 answers such a range read with a 416."""
    from facets.llm.journal import Journal, JournalEntry, request_key

    data_dir = f"{s3.make_bucket('journal-tail')}/data"
    writer = Journal(data_dir, writer_id="writer")
    keys = [request_key("http://sim/v1", "m", [{"role": "user", "content": str(i)}], None, {}, None) for i in range(3)]
    for i, key in enumerate(keys):
        writer.put(JournalEntry(key=key, model="m", content=f"reply {i}", finish_reason="stop"))
    reader = Journal(data_dir, writer_id="reader")
    assert reader.get(keys[0]).content == "reply 0", "read from the writer's live file"
    writer.seal()
    reader.refresh()  # the segment holds the same bytes the reader has already indexed
    assert [reader.get(key).content for key in keys] == ["reply 0", "reply 1", "reply 2"]
    writer.close()
    reader.close()
