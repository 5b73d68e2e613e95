"""The call journal: stable keys, durable puts, immutable segments, many writers, kill -9."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tracemalloc
import uuid

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from facets.llm.journal import Journal, JournalEntry, Usage, request_key

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
SCHEMA = {"type": "json_schema", "json_schema": {"name": "tree", "schema": {"type": "object"}}}
SAMPLING = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 2048}


def key_of(tag: str, i: int) -> str:
    return request_key("http://sim/v1", "m", [{"role": "user", "content": f"{tag}-{i}"}], None, {}, None)


def entry(key: str, content: str | list[str] = "reply", **kw) -> JournalEntry:
    return JournalEntry(key=key, model="m", content=content, **{"finish_reason": "stop", **kw})


# A writer process: puts `n` entries (forever if n < 0), printing the count after each put returns.
# With `pause`, it stops after n // 2 entries until a line arrives on stdin.
CHILD = """
import sys
from facets.llm.journal import Journal, JournalEntry, request_key
data_dir, writer, n, seal, pause = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5] == "1"
j = Journal(data_dir, writer_id=writer, seal_interval_s=seal)
i = 0
while i != n:
    if pause and i == n // 2:
        print("ready", flush=True)
        sys.stdin.readline()
    key = request_key("http://sim/v1", "m", [{"role": "user", "content": f"{writer}-{i}"}], None, {}, None)
    j.put(JournalEntry(key=key, model="m", content=f"{writer}-{i} " + "x" * 3000))
    i += 1
    print(i, flush=True)
j.close()
print("done", flush=True)
"""


def child(data_dir, writer: str, n: int, seal: float = 5.0, pause: bool = False) -> subprocess.Popen:
    args = [sys.executable, "-c", CHILD, str(data_dir), writer, str(n), str(seal), "1" if pause else "0"]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def files(path) -> list[str]:
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


# -- keys -------------------------------------------------------------------------------------


def test_key_is_stable_and_covers_every_input():
    base = dict(endpoint="http://sim/v1", model="m", messages=MESSAGES, response_format=SCHEMA,
                sampling=SAMPLING, salt=None)
    key = request_key(**base)
    assert len(key) == 32 and key == request_key(**base)
    assert key == request_key(**{**base, "endpoint": "http://sim/v1/"})  # normalised
    assert key == request_key(**{**base, "sampling": {**SAMPLING, "seed": None}})  # None = not sent
    assert key == request_key(**{**base, "sampling": dict(reversed(SAMPLING.items()))})
    system = [{**MESSAGES[0], "content": "You are verbose."}, MESSAGES[1]]
    variants = [
        {"endpoint": "http://other/v1"},
        {"model": "m2"},
        {"messages": system},
        {"response_format": None},
        {"response_format": {**SCHEMA, "json_schema": {"name": "tree", "schema": {"type": "array"}}}},
        {"sampling": {**SAMPLING, "temperature": 0.7}},
        {"sampling": {**SAMPLING, "max_tokens": 4096}},
        {"sampling": {**SAMPLING, "seed": 1}},
        {"salt": 1},
        {"salt": "retry-2"},
    ]
    keys = {request_key(**{**base, **v}) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_operational_knobs_are_refused_not_hashed():
    with pytest.raises(ValueError, match="timeout"):
        request_key("http://sim/v1", "m", MESSAGES, None, {"temperature": 1.0, "timeout": 30}, None)


# -- one process ------------------------------------------------------------------------------


def test_put_get_round_trip_and_reopen(tmp_path):
    one = entry(key_of("a", 0), parsed={"tree": [1, 2]}, usage=Usage(prompt_tokens=5, completion_tokens=7))
    many = entry(key_of("a", 1), content=["c1", "c2"], finish_reason=["stop", "length"], source="batch")
    with Journal(str(tmp_path), writer_id="w") as j:
        j.put(one)
        j.put(many)
        assert j.get(one.key) == one and j.get(many.key) == many
        assert one.key in j and key_of("a", 2) not in j and j.get(key_of("a", 2)) is None
        assert len(j) == 2
    reopened = Journal(str(tmp_path))
    assert reopened.get(one.key) == one and reopened.get(many.key) == many and len(reopened) == 2


def test_first_put_of_a_key_wins(tmp_path):
    with Journal(str(tmp_path), writer_id="w") as j:
        j.put(entry(key_of("a", 0), "first"))
        j.put(entry(key_of("a", 0), "second"))
        assert j.get(key_of("a", 0)).content == "first" and len(j) == 1


def test_seal_makes_immutable_segments_with_sidecar_index(tmp_path):
    segments, live = tmp_path / "journal" / "segments", tmp_path / "journal" / "live"
    j = Journal(str(tmp_path), writer_id="w", seal_interval_s=3600)
    for i in range(3):
        j.put(entry(key_of("a", i)))
    assert files(live) == ["w-000001.jsonl"] and files(segments) == []
    j.seal()
    assert files(live) == [] and files(segments) == ["w-000001.idx", "w-000001.jsonl"]
    assert (segments / "w-000001.idx").stat().st_size == 8 + 3 * 28
    first = (segments / "w-000001.jsonl").read_bytes()
    assert all(j.get(key_of("a", i)).key == key_of("a", i) for i in range(3))
    j.put(entry(key_of("a", 3)))
    j.close()
    assert (segments / "w-000001.jsonl").read_bytes() == first  # nothing appended in place
    assert files(segments) == ["w-000001.idx", "w-000001.jsonl", "w-000002.idx", "w-000002.jsonl"]
    assert len(Journal(str(tmp_path))) == 4


def test_seal_interval_is_checked_on_put(tmp_path):
    with Journal(str(tmp_path), writer_id="w", seal_interval_s=0) as j:
        for i in range(3):
            j.put(entry(key_of("a", i)))
        assert len(files(tmp_path / "journal" / "segments")) == 6


def test_failed_seal_does_not_fail_the_put(tmp_path, monkeypatch):
    j = Journal(str(tmp_path), writer_id="w", seal_interval_s=0)
    monkeypatch.setattr(j, "_publish", lambda *a: (_ for _ in ()).throw(OSError("store down")))
    j.put(entry(key_of("a", 0)))  # journaled; the seal is retried later
    assert files(tmp_path / "journal" / "live") == ["w-000001.jsonl"]
    monkeypatch.undo()
    j.put(entry(key_of("a", 1)))
    j.close()
    assert files(tmp_path / "journal" / "segments") == ["w-000001.idx", "w-000001.jsonl"]
    assert len(Journal(str(tmp_path))) == 2


def test_index_holds_no_responses(tmp_path):
    n, content = 2000, "x" * 50_000
    keys = [key_of("big", i) for i in range(n)]
    tracemalloc.start()
    try:
        j = Journal(str(tmp_path), writer_id="w", seal_interval_s=3600)
        before = tracemalloc.get_traced_memory()[0]
        for key in keys:
            j.put(entry(key, content))
        writer_growth = tracemalloc.get_traced_memory()[0] - before
        j.close()
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        reader = Journal(str(tmp_path))
        reader_growth, reader_peak = (m - before for m in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    assert len(reader) == n and reader.get(keys[-1]).content == content
    total = n * len(content)  # 100 MB of responses
    assert writer_growth < total / 100 and reader_growth < total / 100  # ~150 B per entry
    assert reader_peak < total / 50  # the reader used the sidecar index, not the responses


# -- many processes ---------------------------------------------------------------------------


def test_two_writer_processes_share_one_data_dir(tmp_path):
    writers = [child(tmp_path, name, 300, seal=0.01) for name in ("a", "b")]
    for p in writers:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0 and out.splitlines()[-1] == "done"
    j = Journal(str(tmp_path))
    assert len(j) == 600
    assert all(j.get(key_of(w, i)).content.startswith(f"{w}-{i} ") for w in "ab" for i in range(300))


def test_reader_follows_a_running_writer_through_its_seal(tmp_path):
    p = child(tmp_path, "a", 100, seal=3600, pause=True)
    while p.stdout.readline().strip() != "ready":
        pass
    reader = Journal(str(tmp_path))
    assert len(reader) == 50  # read from the writer's live file
    assert reader.get(key_of("a", 0)).content.startswith("a-0 ")
    p.stdin.write("go\n")
    p.stdin.flush()
    assert p.stdout.read().splitlines()[-1] == "done" and p.wait(timeout=30) == 0
    # The live file is now a segment; the index still points at it until get notices.
    assert reader.get(key_of("a", 1)).content.startswith("a-1 ")
    reader.refresh()
    assert len(reader) == 100 and reader.get(key_of("a", 99)).content.startswith("a-99 ")
    assert files(tmp_path / "journal" / "live") == []


def test_kill_9_loses_at_most_the_call_in_flight(tmp_path):
    p = child(tmp_path, "k", -1, seal=0.02)
    reported = 0
    segments = tmp_path / "journal" / "segments"
    while reported < 400 or not files(segments):  # killed only once it has sealed along the way
        reported = int(p.stdout.readline())
    os.kill(p.pid, signal.SIGKILL)
    reported = max([reported] + [int(line) for line in p.stdout.read().split()])
    p.wait(timeout=30)
    assert files(tmp_path / "journal" / "segments")  # it sealed along the way
    j = Journal(str(tmp_path))  # recovers the orphan live file
    assert reported <= len(j) <= reported + 1
    assert all(j.get(key_of("k", i)) is not None for i in range(reported))
    assert files(tmp_path / "journal" / "live") == []


def test_half_written_line_is_skipped_then_sealed_away(tmp_path):
    live = tmp_path / "journal" / "live"
    live.mkdir(parents=True)
    lines = [entry(key_of("o", i)).model_dump_json().encode() + b"\n" for i in range(4)]
    orphan = live / "w-000001.jsonl"
    orphan.write_bytes(b"".join(lines[:3]) + lines[3][:100])
    fd = os.open(orphan, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # its writer is still alive
    try:
        reader = Journal(str(tmp_path))
        assert len(reader) == 3 and files(live) == ["w-000001.jsonl"]
        with open(orphan, "ab") as f:  # the writer finishes its line
            f.write(lines[3][100:])
        reader.refresh()
        assert len(reader) == 4
        with open(orphan, "ab") as f:  # ... and is killed in the middle of the next one
            f.write(lines[0][:50])
    finally:
        os.close(fd)
    with Journal(str(tmp_path), writer_id="w") as same_writer:  # seals its own orphan first
        assert files(live) == [] and len(same_writer) == 4
        same_writer.put(entry(key_of("o", 9)))
    segments = tmp_path / "journal" / "segments"
    assert files(segments) == ["w-000001.idx", "w-000001.jsonl", "w-000002.idx", "w-000002.jsonl"]
    assert (segments / "w-000001.jsonl").read_bytes() == b"".join(lines)
    reader.refresh()
    assert len(reader) == 5 and all(reader.get(key_of("o", i)) for i in range(4))


# -- object stores ----------------------------------------------------------------------------


def test_memory_fs_data_dir_writes_each_file_with_one_put(tmp_path, monkeypatch):
    writes: list[tuple[str, str]] = []
    open_ = MemoryFileSystem.open

    def recording_open(self, path, mode="rb", *args, **kwargs):
        if "r" not in mode:
            writes.append((path, mode))
        return open_(self, path, mode, *args, **kwargs)

    monkeypatch.setattr(MemoryFileSystem, "open", recording_open)
    monkeypatch.delenv("FACETS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    data_dir = f"memory://journal-{uuid.uuid4().hex}"
    try:
        j = Journal(data_dir, writer_id="w", seal_interval_s=3600)
        for i in range(10):
            j.put(entry(key_of("m", i)))
        assert files(tmp_path / "cache" / "facets" / "journal-live" / os.listdir(
            tmp_path / "cache" / "facets" / "journal-live")[0]) == ["w-000001.jsonl"]
        j.seal()
        for i in range(10, 15):
            j.put(entry(key_of("m", i)))
        j.close()
        names = [path.rsplit("/", 1)[-1] for path, _ in writes]
        assert sorted(names) == ["w-000001.idx", "w-000001.jsonl", "w-000002.idx", "w-000002.jsonl"]
        assert all(mode == "wb" for _, mode in writes)
        other = Journal(data_dir, live_dir=str(tmp_path / "elsewhere"))
        assert len(other) == 15 and other.get(key_of("m", 14)).key == key_of("m", 14)
    finally:
        MemoryFileSystem().rm(data_dir, recursive=True)


def test_orphan_live_file_of_a_remote_data_dir_is_uploaded(tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    lines = [entry(key_of("r", i)).model_dump_json().encode() + b"\n" for i in range(3)]
    (live / "gone-000004.jsonl").write_bytes(b"".join(lines) + lines[0][:30])
    data_dir = f"memory://journal-{uuid.uuid4().hex}"
    try:
        j = Journal(data_dir, live_dir=str(live))
        assert files(live) == [] and len(j) == 3 and j.get(key_of("r", 2)).key == key_of("r", 2)
        fs = MemoryFileSystem()
        assert fs.cat_file(f"{data_dir}/journal/segments/gone-000004.jsonl") == b"".join(lines)
        assert j.writer_id != Journal(data_dir, live_dir=str(live)).writer_id  # unique by default
    finally:
        MemoryFileSystem().rm(data_dir, recursive=True)
