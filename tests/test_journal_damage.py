"""A journal that survives damage: a cut, emptied or garbled segment, a line overwritten in place, a wrong
sidecar. Each is named in one warning and moved to journal/damaged/; its good entries are still answered and
only the damaged ones are asked again. A damaged stage Parquet file is moved aside and its rows made again."""
from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import shutil
import struct
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from facets.llm.journal import Journal, JournalEntry, request_key

PER_SEGMENT = 5
WRITER = "w"
DAMAGED = f"{WRITER}-000002"  # the middle one of three segments
WRITTEN = datetime(2025, 1, 2, tzinfo=timezone.utc)


def key_of(i: int) -> str:
    return request_key("http://sim/v1", "m", [{"role": "user", "content": f"q-{i}"}], None, {}, None)


def entry(i: int) -> JournalEntry:
    return JournalEntry(key=key_of(i), model="m", content=f"reply {i} " + "y" * 600, finish_reason="stop",
                        created_at=WRITTEN)


def write_journal(data_dir: str, segments: int = 3) -> list[str]:
    """`segments` sealed segments of PER_SEGMENT entries each; the keys in order."""
    with Journal(data_dir, writer_id=WRITER, seal_interval_s=3600) as j:
        for i in range(segments * PER_SEGMENT):
            j.put(entry(i))
            if (i + 1) % PER_SEGMENT == 0:
                j.seal()
    return [key_of(i) for i in range(segments * PER_SEGMENT)]


def segment(tmp_path: Path, suffix: str = ".jsonl") -> Path:
    return tmp_path / "journal" / "segments" / f"{DAMAGED}{suffix}"


def line_spans(path: Path) -> list[tuple[int, int]]:
    data, spans, pos = path.read_bytes(), [], 0
    while pos < len(data):
        end = data.index(b"\n", pos) + 1
        spans.append((pos, end))
        pos = end
    return spans


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


class Records(logging.Handler):
    """The warnings of one logger, whatever Prefect's logging setup does to the root logger's handlers."""

    def __init__(self, name: str):
        super().__init__(logging.WARNING)
        self.logger, self.records = logging.getLogger(name), []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> list[logging.LogRecord]:
        self.logger.addHandler(self)
        return self.records

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)


class Warnings:
    """The journal's warning lines, from a point on (`clear`)."""

    def __init__(self, records: list[logging.LogRecord]):
        self.records = records

    def clear(self) -> None:
        self.records.clear()

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def warned():
    with Records("facets.llm.journal") as records:
        yield Warnings(records)


def check_damage(tmp_path: Path, warned, keys: list[str], lost: set[int], at_open: bool) -> Journal:
    """Open the journal, ask every key; one warning names the segment, which is now in journal/damaged/;
    the entries of `lost` are None and every other one is answered."""
    warned.clear()
    j = Journal(str(tmp_path))
    moved = tmp_path / "journal" / "damaged" / f"{DAMAGED}.jsonl"
    assert moved.exists() == at_open, "a sidecar that disagrees with its segment is found at open"
    answers = {i: j.get(key) for i, key in enumerate(keys)}
    assert [i for i, a in answers.items() if a is None] == sorted(lost)
    assert all(answers[i] == entry(i) for i in answers if i not in lost)
    [warning] = warned.lines()
    assert str(segment(tmp_path)) in warning and "moved to" in warning
    assert moved.exists() and not segment(tmp_path).exists()
    assert (tmp_path / "journal" / "damaged" / f"{DAMAGED}.idx").exists(), "moved with its sidecar"
    assert sorted(os.listdir(tmp_path / "journal" / "segments")) == [
        f"{WRITER}-00000{n}{ext}" for n in (1, 3) for ext in (".idx", ".jsonl")]
    return j


def check_reopen(tmp_path: Path, warned, keys: list[str], lost: set[int]) -> None:
    """A later open indexes the good lines of the moved segment, says nothing more, and a lost call asked
    again is journaled and answered."""
    warned.clear()
    again = Journal(str(tmp_path), writer_id="again")
    assert [i for i, key in enumerate(keys) if again.get(key) is None] == sorted(lost)
    assert len(again) == len(keys) - len(lost) and not warned.lines()
    for i in lost:
        again.put(entry(i))
    assert all(again.get(key) == entry(i) for i, key in enumerate(keys))
    again.close()
    assert all(Journal(str(tmp_path)).get(key) == entry(i) for i, key in enumerate(keys))


# -- segments -------------------------------------------------------------------------------------


def test_segment_cut_mid_line(tmp_path, warned):
    keys = write_journal(str(tmp_path))
    start, end = line_spans(segment(tmp_path))[2]
    os.truncate(segment(tmp_path), start + (end - start) // 2)
    lost = {PER_SEGMENT + 2, PER_SEGMENT + 3, PER_SEGMENT + 4}
    check_damage(tmp_path, warned, keys, lost, at_open=True)
    check_reopen(tmp_path, warned, keys, lost)


def test_segment_emptied(tmp_path, warned):
    keys = write_journal(str(tmp_path))
    os.truncate(segment(tmp_path), 0)
    lost = set(range(PER_SEGMENT, 2 * PER_SEGMENT))
    check_damage(tmp_path, warned, keys, lost, at_open=True)
    check_reopen(tmp_path, warned, keys, lost)


def test_one_line_garbled(tmp_path, warned):
    keys = write_journal(str(tmp_path))
    start, end = line_spans(segment(tmp_path))[1]
    overwrite(segment(tmp_path), start + 40, b"\x00\xff garbage }{ " * 4)  # same size: the sidecar agrees
    lost = {PER_SEGMENT + 1}
    check_damage(tmp_path, warned, keys, lost, at_open=False)
    check_reopen(tmp_path, warned, keys, lost)


def test_300_bytes_overwritten_inside_a_line_that_stays_valid_json(tmp_path, warned):
    keys = write_journal(str(tmp_path))
    start, end = line_spans(segment(tmp_path))[3]
    line = segment(tmp_path).read_bytes()[start:end]
    inside = line.index(b"y" * 300)  # within the content string
    overwrite(segment(tmp_path), start + inside, b"X" * 300)
    orjson.loads(segment(tmp_path).read_bytes()[start:end])  # still valid JSON, and the same key
    lost = {PER_SEGMENT + 3}
    j = check_damage(tmp_path, warned, keys, lost, at_open=False)
    assert "checksum" in warned.lines()[0]
    assert j.get(keys[PER_SEGMENT + 3]) is None and keys[PER_SEGMENT + 3] not in j  # asked again, never used
    check_reopen(tmp_path, warned, keys, lost)


def test_sidecar_that_is_not_an_index(tmp_path, warned):
    keys = write_journal(str(tmp_path))
    overwrite(segment(tmp_path, ".idx"), 0, b"garbage!")
    check_damage(tmp_path, warned, keys, set(), at_open=True)  # the segment itself is whole: nothing lost
    check_reopen(tmp_path, warned, keys, set())


def test_sidecar_pointing_past_the_end(tmp_path, warned):
    keys = write_journal(str(tmp_path))
    size = segment(tmp_path).stat().st_size
    record = struct.Struct("<16sQI")
    sidecar = segment(tmp_path, ".idx")
    digest, offset, length = record.unpack_from(sidecar.read_bytes(), sidecar.stat().st_size - record.size)
    overwrite(sidecar, sidecar.stat().st_size - record.size, record.pack(digest, size + 100, length))
    warned.clear()
    check_damage(tmp_path, warned, keys, set(), at_open=True)
    assert f"the segment at byte {size}" in warned.lines()[0]


def test_sidecar_record_pointing_at_another_line(tmp_path, warned):
    """A wrong record in the middle of a sidecar passes the size check: `get` finds the other key there,
    and the entry is still answered from its own line once the segment is read."""
    keys = write_journal(str(tmp_path))
    record = struct.Struct("<16sQI")
    sidecar = segment(tmp_path, ".idx")
    data = sidecar.read_bytes()
    first, second = (record.unpack_from(data, 8 + n * record.size) for n in (0, 1))
    overwrite(sidecar, 8, record.pack(first[0], second[1], second[2]))  # key 5 -> the line of key 6
    check_damage(tmp_path, warned, keys, set(), at_open=False)


def test_old_lines_without_checksum_are_read_and_checked(tmp_path, warned):
    """Journals written before checksums: still answered; a garbled old line is caught by parsing."""
    live = tmp_path / "journal" / "live"
    live.mkdir(parents=True)
    lines = [entry(i).model_dump_json().encode() + b"\n" for i in range(3)]
    (live / "old-000001.jsonl").write_bytes(b"".join(lines))
    assert all(Journal(str(tmp_path)).get(key_of(i)) == entry(i) for i in range(3))  # sealed as an orphan
    path = tmp_path / "journal" / "segments" / "old-000001.jsonl"
    overwrite(path, len(lines[0]) + 60, b"}}}")
    warned.clear()
    j = Journal(str(tmp_path))
    assert [j.get(key_of(i)) is None for i in range(3)] == [False, True, False]
    [warning] = warned.lines()
    assert str(path) in warning and "does not parse" in warning
    assert (tmp_path / "journal" / "damaged" / "old-000001.jsonl").exists()


def test_a_reader_follows_a_segment_another_one_moved_aside(tmp_path, warned):
    keys = write_journal(str(tmp_path))
    early = Journal(str(tmp_path))  # indexed the segment before it was found damaged
    start, _ = line_spans(segment(tmp_path))[4]
    overwrite(segment(tmp_path), start + 100, b"#")
    finder = Journal(str(tmp_path))
    assert finder.get(keys[PER_SEGMENT + 4]) is None and not segment(tmp_path).exists()
    warned.clear()
    assert [i for i, key in enumerate(keys) if early.get(key) is None] == [PER_SEGMENT + 4]
    assert not any("moved to" in w for w in warned.lines()), "only the reader that moved it says so"


def test_object_store_segment_cut(tmp_path, warned):
    data_dir = f"memory://journal-{uuid.uuid4().hex}"
    fs = MemoryFileSystem()
    try:
        keys = write_journal(data_dir)
        path = f"{data_dir}/journal/segments/{DAMAGED}.jsonl".replace("memory://", "/")
        fs.pipe_file(path, fs.cat_file(path)[:1000])
        warned.clear()
        j = Journal(data_dir, live_dir=str(tmp_path / "live"))
        assert [i for i, key in enumerate(keys) if j.get(key) is None] == list(range(PER_SEGMENT + 1, 2 * PER_SEGMENT))
        [warning] = warned.lines()
        assert DAMAGED in warning and fs.exists(path.replace("/segments/", "/damaged/")) and not fs.exists(path)
        again = Journal(data_dir, live_dir=str(tmp_path / "live"))
        assert len(again) == len(keys) - (PER_SEGMENT - 1)
    finally:
        fs.rm(data_dir.replace("memory://", "/"), recursive=True)


# -- temporary files of dead writers ----------------------------------------------------------------


def test_temporary_files_of_dead_writers_are_removed_at_open(tmp_path):
    write_journal(str(tmp_path), segments=1)
    segments, live = tmp_path / "journal" / "segments", tmp_path / "journal" / "live"
    old = segments / "gone-000003.idx.0badcafe.tmp"  # a full disk, long ago
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 600, time.time() - 600))
    (live / "dead-000001.jsonl").write_bytes(entry(99).model_dump_json().encode() + b"\n")
    orphan = segments / "dead-000001.idx.00c0ffee.tmp"  # its writer died in the middle of a seal
    orphan.write_bytes(b"x")
    busy = segments / "busy-000001.jsonl.0000beef.tmp"  # a live writer, sealing now
    busy.write_bytes(b"x")
    (live / "busy-000001.jsonl").write_bytes(b"")
    young = segments / "elsewhere-000001.idx.0000f00d.tmp"  # a writer whose live file is elsewhere
    young.write_bytes(b"x")
    fd = os.open(live / "busy-000001.jsonl", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        j = Journal(str(tmp_path))
    finally:
        os.close(fd)
    assert not old.exists() and not orphan.exists()
    assert busy.exists() and young.exists()
    assert j.get(entry(99).key) == entry(99)  # the dead writer's orphan was sealed as well


# -- end to end: a real build on the simulator ------------------------------------------------------

LLM_STAGES = ("preference_trees", "preference_sets", "system_messages", "responses", "pairs")


def build_config(sim_url: str, data_dir: Path, **overrides):
    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    from test_build import config  # the end-to-end tests' build config

    return config(sim_url, data_dir, **overrides)


def build(cfg) -> dict:
    from facets.flows.build import build_collection

    return asyncio.run(build_collection(cfg))


def stage_rows(data_dir: Path) -> dict[str, dict[tuple, dict]]:
    """stage -> (instruction id, set index, fingerprint) -> the row but for when it was written."""
    from facets.storage import Store

    store, out = Store(str(data_dir)), {}
    for stage in LLM_STAGES:
        rows = store.read(stage).to_pylist()
        out[stage] = {(r["instruction_id"], r.get("set_index", 0), r["fingerprint"]):
                      {k: v for k, v in r.items() if k != "created_at"} for r in rows}
    return out


def drop_stage_rows(data_dir: Path) -> None:
    """Every row made from a call goes: a rebuild asks the journal for all of them."""
    for stage in LLM_STAGES:
        shutil.rmtree(data_dir / "stages" / stage, ignore_errors=True)


def test_rebuild_with_a_cut_journal_segment_asks_only_the_lost_calls_again(tmp_path, prefect_server):
    from facets.simulator.server import run_simulator

    built, control = tmp_path / "built", tmp_path / "control"
    with run_simulator(seed=3) as sim:  # a seed whose 4 instructions all succeed: the rebuild draws the same 4
        build(build_config(sim.base_url, built, limit=4))
        first = stage_rows(built)
        drop_stage_rows(built)
        shutil.copytree(built, control)  # the same rebuild from a whole journal: what a rebuild asks anyway
        damaged = max((p for p in (built / "journal" / "segments").iterdir() if p.suffix == ".jsonl"),
                      key=lambda p: p.stat().st_size)
        keys = [orjson.loads(line)["key"] for line in damaged.read_bytes().splitlines()]
        spans = line_spans(damaged)
        cut = len(spans) // 2
        os.truncate(damaged, spans[cut][0] + 50)  # mid-line: this line and every one after it are lost
        lost = len(keys) - cut
        assert lost > 0

        before = sim.stats()
        build(build_config(sim.base_url, control, limit=4))
        middle = sim.stats()
        with Records("facets.llm.journal") as records:
            build(build_config(sim.base_url, built, limit=4))
        after = sim.stats()

    asked_anyway = middle["requests"] - before["requests"]  # calls that failed before are retried
    assert after["requests"] - middle["requests"] - asked_anyway == lost
    assert after["paid_twice"] - middle["paid_twice"] - (middle["paid_twice"] - before["paid_twice"]) <= lost
    [warning] = [r.getMessage() for r in records]
    assert str(damaged) in warning and "moved to" in warning and (built / "journal" / "damaged" / damaged.name).exists()
    assert stage_rows(built) == first  # the simulator answers a request the same way every time


def test_rebuild_with_a_cut_stage_file_moves_it_aside_and_makes_its_rows_again(tmp_path, prefect_server):
    from facets.simulator.server import run_simulator

    with run_simulator(seed=1) as sim:
        report = build(build_config(sim.base_url, tmp_path, publish=True))
        first = stage_rows(tmp_path)
        cut = sorted((tmp_path / "stages" / "responses").glob("*.parquet"))[0]
        os.truncate(cut, cut.stat().st_size // 2)
        before = sim.stats()["requests"]
        with Records("facets") as records:
            again = build(build_config(sim.base_url, tmp_path, publish=True))
        asked = sim.stats()["requests"] - before
    [record] = [r for r in records if cut.name in r.getMessage()]  # one line, no traceback
    assert str(cut) in record.getMessage() and "moved to" in record.getMessage() and record.exc_info is None
    assert not cut.exists() and (tmp_path / "damaged" / "stages" / "responses" / cut.name).exists()
    assert asked == 0, "its rows came back from the journal"
    assert again["stages"]["responses"]["made"] > 0 and again["accepted"] == report["accepted"]
    assert stage_rows(tmp_path) == first
    assert again["release"]["version"] == report["release"]["version"]
