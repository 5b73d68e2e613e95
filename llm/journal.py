"""The LLM call journal: never pay twice (docs/ARCHITECTURE.md, principle 2, decision 4).

Every successful call is appended as one JSON line to this writer's *live* file before the call
counts as done. Every `seal_interval_s` (and at `seal()` / `close()`) the live file becomes an
immutable *segment* of the data dir with a binary sidecar index. The in-memory index maps a
16-byte key digest to one packed int (file id, offset, length); responses stay on disk.

Layout under ``<data_dir>/journal/``::

    live/<writer>-<seq>.jsonl      appended by one writer (remote data dirs: under `live_dir`)
    segments/<writer>-<seq>.jsonl  a sealed live file, byte for byte; never written again
    segments/<writer>-<seq>.idx    sidecar: magic, then (key digest, offset u64, length u32) records
    damaged/<writer>-<seq>.jsonl   a segment found damaged, moved aside with its sidecar; its good lines are still used

A live file is named after the segment it becomes, so a reader that indexed part of it keeps its
offsets when it is sealed, and sealing an orphan twice writes the same bytes again.
Each live writer holds an exclusive `flock` on its live file; a live file nobody locks is an
orphan of a killed writer, which `recover()` seals (cut to its last complete line).

Each line ends with a CRC-32 of the line without it (`"crc32"`, the last field, so `key` stays first);
lines written before checksums existed have none and are still read. Damage is found without reading
segments at open: a sidecar that does not end where its segment does, or a line that `get` reads and finds
cut, garbled or holding another key. Such a segment is named in one warning and moved to ``damaged/``;
its lines that pass their checks are indexed there, at the same offsets, and only the lost calls are asked
again. Temporary files of dead writers are removed at open.
"""
from __future__ import annotations

import binascii
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import secrets
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import fsspec
import orjson
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from facets.storage.store import local_cache, move_file, read_local

log = logging.getLogger(__name__)

KEY_BYTES = 16

# Request fields that change what the model generates, so they are part of the key. Anything else
# (timeouts, retries, concurrency, ...) is refused by `request_key` rather than silently dropped:
# an unknown field might change the reply, and two different requests must never share a key.
SAMPLING_KEYS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "seed", "n",
    "stop", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
    "logprobs", "top_logprobs", "reasoning_effort",
})

_IDX_MAGIC = b"FJIDX01\n"
_IDX_REC = struct.Struct("<16sQI")
_KEY_PREFIX = b'{"key":"'
_KEY_END = len(_KEY_PREFIX) + 2 * KEY_BYTES
_OFF_MASK, _LEN_MASK = (1 << 40) - 1, (1 << 32) - 1
_SUM_FIELD = b',"crc32":"'
_SUM_TAIL = len(_SUM_FIELD) + 8 + len(b'"}\n')  # the checksum field, closing brace and newline end each line
_TEMP = re.compile(r"(.+)\.(idx|jsonl)\.[0-9a-f]{8}\.tmp")  # `Journal._write`'s temporary names
STALE_TEMP_S = 60.0  # a temporary file older than this is not being written: a writer renames it within a second
_WRITER_ID = re.compile(r"[A-Za-z0-9._]+(-[A-Za-z0-9._]+)*")


def request_key(
    endpoint: str,
    model: str,
    messages: list[dict],
    response_format: dict | None,
    sampling: dict,
    salt: str | int | None,
) -> str:
    """Hex digest (32 chars) of everything that decides a reply; see `SAMPLING_KEYS`.

    A sampling value of None counts as absent (the client does not send it).
    """
    unknown = set(sampling) - SAMPLING_KEYS
    if unknown:
        raise ValueError(f"not generation parameters, keep them out of the key: {sorted(unknown)}")
    payload = {
        "endpoint": endpoint.rstrip("/"),
        "model": model,
        "messages": messages,
        "response_format": response_format,
        "sampling": {k: v for k, v in sampling.items() if v is not None},
        "salt": salt,
    }
    canonical = orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=KEY_BYTES).hexdigest()


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


class JournalEntry(BaseModel):
    """One paid call. `key` must stay the first field: readers find it at a fixed line prefix."""

    key: str = Field(pattern=rf"^[0-9a-f]{{{2 * KEY_BYTES}}}$")  # `request_key`
    model: str
    content: str | list[str]  # a list when n > 1, one item per choice
    finish_reason: str | list[str] | None = None
    parsed: Any = None  # the JSON the caller validated, if any
    usage: Usage = Field(default_factory=Usage)
    latency_s: float = 0.0
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    source: Literal["online", "batch"] = "online"
    # a reply paid for but not accepted (its reason): a rerun goes on from it instead of paying for it again
    rejected: str | None = None


_ENTRY = TypeAdapter(JournalEntry)


class JournalError(RuntimeError):
    pass


@dataclass
class _File:
    path: str
    local: bool  # read with os calls; otherwise through the data dir's fsspec filesystem
    consumed: int = 0  # bytes indexed so far (live files are read incrementally)


@dataclass
class _Live:
    """This writer's open live file."""

    fd: int
    path: str
    stem: str
    fid: int
    opened: float = field(default_factory=time.monotonic)
    size: int = 0
    idx: bytearray = field(default_factory=bytearray)


class Journal:
    """Append-only call journal shared by any number of writer processes.

    `get` answers from the index built at open and by `refresh()`; it does no listing itself.
    A `writer_id` must not be used by two live processes at once (the default is unique).
    `live_dir` places live files when `data_dir` is remote (default: a per-data-dir cache folder);
    a local data dir keeps them in ``journal/live`` unless `live_dir` says otherwise.
    `skip(stem)` names other writers' files this reader leaves unindexed because they cannot hold the
    keys it will ask for (the other shards of its own build): what it reads stays in proportion to its work.
    """

    def __init__(
        self,
        data_dir: str,
        writer_id: str | None = None,
        seal_interval_s: float = 5.0,
        live_dir: str | None = None,
        skip: Callable[[str], bool] | None = None,
    ):
        self.fs, root = fsspec.core.url_to_fs(data_dir)
        root = root.rstrip("/")
        self._local = isinstance(self.fs, LocalFileSystem)
        self._seg_dir = f"{root}/journal/segments"
        self._damaged_dir = f"{root}/journal/damaged"
        # off the data dir's disk, the live files stay on this machine, where a restarted worker finds them
        local = f"{root}/journal/live" if self._local else local_cache(self.fs.unstrip_protocol(root), "journal-live")
        self._live_dir = live_dir or local
        self._rename = self._local and live_dir is None  # live and segments share a filesystem
        self.writer_id = writer_id or default_writer_id()
        if not _WRITER_ID.fullmatch(self.writer_id):
            raise ValueError(f"writer_id must be [A-Za-z0-9._-] without edge dashes: {self.writer_id!r}")
        self.seal_interval_s = seal_interval_s
        self._skip = skip or (lambda stem: False)
        self._index: dict[bytes, int] = {}
        self._files: list[_File] = []
        self._sealed: set[str] = set()  # segment stems indexed
        self._others: dict[str, int] = {}  # live stem -> file id, other writers' live files
        self._sizes: dict[str, int] = {}  # segment name -> size, from an object store's listing
        self._reported: set[str] = set()  # files whose damage was reported
        self._live: _Live | None = None
        self._seq: int | None = None
        self._closed = False
        self._lock = threading.RLock()
        os.makedirs(self._live_dir, exist_ok=True)
        self.fs.makedirs(self._seg_dir, exist_ok=True)
        self._remove_dead_temps()
        self.recover()
        self.refresh()

    # -- writing -------------------------------------------------------------------------------

    def put(self, entry: JournalEntry) -> None:
        """Append `entry` to the live file; it is in the OS (safe from kill -9) when this returns."""
        line = _line(entry)
        key = bytes.fromhex(entry.key)
        with self._lock:
            live = self._live or self._open_live()
            offset = live.size
            _write_all(live.fd, line, offset)
            live.size += len(line)
            live.idx += _IDX_REC.pack(key, offset, len(line))
            self._index.setdefault(key, _pack(live.fid, offset, len(line)))
            if time.monotonic() - live.opened >= self.seal_interval_s:
                self._auto_seal(live)

    def _auto_seal(self, live: _Live) -> None:
        # The entry is already safe in the live file: a failed seal must not fail the put (the
        # caller would pay again). The live file stays open and the seal is retried later.
        try:
            self._seal_live()
        except Exception:
            live.opened = time.monotonic()
            log.warning("journal seal of %s failed; retrying in %.0fs", live.path, self.seal_interval_s, exc_info=True)

    def seal(self) -> None:
        """Turn the live file into a segment now (e.g. at shard end)."""
        with self._lock:
            if self._live is not None:
                self._seal_live()

    def close(self) -> None:
        """Seal the live file and let the index go (at 65k instructions it is 100 MB a build does not need
        while it publishes); a closed journal answers no `get`, so nothing is paid twice by mistake."""
        with self._lock:
            if not self._closed:
                self.seal()
                self._closed = True
                self._index, self._files, self._others = {}, [], {}

    def recover(self) -> int:
        """Seal live files whose writer is gone (nobody holds their lock); returns how many."""
        sealed = 0
        for stem in _stems(os.listdir(self._live_dir), ".jsonl"):
            path = f"{self._live_dir}/{stem}.jsonl"
            fd = _lock_orphan(path)
            if fd is None:
                continue
            try:
                data = os.pread(fd, os.fstat(fd).st_size, 0)
                data = data[: data.rfind(b"\n") + 1]  # a killed writer may leave half a line
                if not data:
                    os.unlink(path)
                    continue
                os.ftruncate(fd, len(data))
                self._publish(fd, path, stem, _build_idx(data))
                sealed += 1
            finally:
                os.close(fd)
        return sealed

    def _remove_dead_temps(self) -> None:
        """Temporary files of `_write` whose writer is gone: older than a minute (a writer renames its own
        at once), or of a live file nobody holds (a killed writer's, which `recover()` seals again)."""
        if not self._local:
            return  # an object store gets one PUT per file: no temporary files
        now = time.time()
        for name in os.listdir(self._seg_dir):
            match = _TEMP.fullmatch(name)
            if match is None:
                continue
            path = f"{self._seg_dir}/{name}"
            try:
                stale = now - os.stat(path).st_mtime > STALE_TEMP_S
            except FileNotFoundError:  # renamed meanwhile by its writer
                continue
            if stale or self._orphaned(match[1]):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                log.info("removed %s, a temporary file of a writer that is gone", path)

    def _orphaned(self, stem: str) -> bool:
        """Whether the live file `stem` is here and nobody holds its lock."""
        fd = _lock_orphan(f"{self._live_dir}/{stem}.jsonl")
        if fd is not None:
            os.close(fd)
        return fd is not None

    def _open_live(self) -> _Live:
        if self._closed:
            raise JournalError("journal is closed")
        if self._seq is None:
            self._seq = self._last_seq()
        while True:
            self._seq += 1
            stem = f"{self.writer_id}-{self._seq:06d}"
            path = f"{self._live_dir}/{stem}.jsonl"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            except FileExistsError:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, path):  # else `recover()` took it for an empty orphan in between
                break
            os.close(fd)
        self._live = _Live(fd, path, stem, self._add_file(path, local=True))
        return self._live

    def _last_seq(self) -> int:
        # a stem moved aside stays taken: a reader that indexed it would pass over a new segment of that name
        names = os.listdir(self._live_dir) + self._list(self._seg_dir) + self._list(self._damaged_dir)
        seqs = [0]
        for stem in _stems(names, ".jsonl"):
            writer, _, seq = stem.rpartition("-")
            if writer == self.writer_id and seq.isdigit():
                seqs.append(int(seq))
        return max(seqs)

    def _seal_live(self) -> None:
        live = self._live
        if live.size:  # on failure the live file stays open, to be sealed next time
            segment = self._publish(live.fd, live.path, live.stem, bytes(live.idx))
            self._sealed.add(live.stem)
            self._files[live.fid] = _File(segment, self._local, live.size)
        else:
            os.unlink(live.path)
        self._live = None
        os.close(live.fd)

    def _publish(self, fd: int, live_path: str, stem: str, idx: bytes) -> str:
        """Make a locked live file segment `stem`. The sidecar goes first and the live file goes
        last, so a crash at any step leaves a live file that `recover()` seals again."""
        segment = f"{self._seg_dir}/{stem}.jsonl"
        self._write(f"{self._seg_dir}/{stem}.idx", _IDX_MAGIC + idx)
        if self._rename:
            os.fsync(fd)
            os.replace(live_path, segment)
        else:
            self._write(segment, os.pread(fd, os.fstat(fd).st_size, 0))
            os.unlink(live_path)
        return segment

    def _write(self, path: str, data: bytes) -> None:
        """One immutable file: temp + rename locally, one PUT on an object store."""
        if not self._local:
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.{secrets.token_hex(4)}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a full disk: leave no half file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    # -- reading -------------------------------------------------------------------------------

    def get(self, key: str) -> JournalEntry | None:
        """The entry of `key`, or None: never journaled, or its line is damaged (then it is reported, never
        used, and the call is asked again)."""
        digest = bytes.fromhex(key)
        with self._lock:
            if self._closed:
                raise JournalError("journal is closed")
            for _ in range(2):  # once more after a damaged segment was indexed again from its good lines
                ptr = self._index.get(digest)
                if ptr is None:
                    return None
                entry, problem = _entry_of(self._read_line(ptr), key)
                if problem is None:
                    return entry
                self._damaged_line(digest, ptr, problem)
            return None

    def _read_line(self, ptr: int) -> bytes | None:
        """The bytes `ptr` points at, following its file if it moved since our refresh; None if it is gone."""
        try:
            return self._read_at(ptr)
        except FileNotFoundError:  # another writer sealed that live file: a refresh points its id at the segment
            self.refresh()
        try:
            return self._read_at(ptr)
        except FileNotFoundError:  # a segment another reader moved aside, same bytes
            self._follow_to_damaged(ptr >> 72)
        try:
            return self._read_at(ptr)
        except FileNotFoundError:
            return None

    def _follow_to_damaged(self, fid: int) -> None:
        f = self._files[fid]
        if f.path.startswith(f"{self._seg_dir}/"):
            f.path = f"{self._damaged_dir}/{f.path.rsplit('/', 1)[-1]}"

    def _damaged_line(self, digest: bytes, ptr: int, problem: str) -> None:
        """A line `get` cannot use leaves the index; a segment holding one is moved aside (`_quarantine`)."""
        if self._index.get(digest) == ptr:
            del self._index[digest]
        fid = ptr >> 72
        path, where = self._files[fid].path, f"{problem} at byte {(ptr >> 32) & _OFF_MASK}"
        if path.startswith(f"{self._seg_dir}/"):
            self._quarantine(fid, where)
        elif path not in self._reported:  # a live file (its writer owns it) or a segment moved aside already
            self._reported.add(path)
            log.warning("journal file %s: %s; that call is asked again", path, where)
        else:
            log.info("journal file %s: %s; that call is asked again", path, where)

    def _quarantine(self, fid: int, problem: str) -> None:
        """Move a damaged segment and its sidecar to damaged/ (never delete them), say so in one line, and
        index the lines of it that pass every check where they now are: only the lost calls are asked again."""
        f = self._files[fid]
        segment = f.path
        target = f"{self._damaged_dir}/{segment.rsplit('/', 1)[-1]}"
        moved = move_file(self.fs, segment, target)
        move_file(self.fs, f"{segment[:-6]}.idx", f"{target[:-6]}.idx")
        f.path = target
        good, bad = self._index_verified(fid)
        self._reported.add(target)
        if moved:
            log.warning("journal segment %s is damaged (%s): moved to %s; its %d good entries are used from there, "
                        "%d damaged ones are asked again", segment, problem, target, good, bad)

    def _index_verified(self, fid: int) -> tuple[int, int]:
        """Index the lines of a damaged file that pass every check `get` makes, in place of what its sidecar
        said, and drop its other keys; returns (good lines, damaged lines). Reads the whole file: only damaged
        files are read so."""
        try:
            data = self._read(self._files[fid], 0, None)
        except FileNotFoundError:
            data = b""
        index, kept, bad = self._index, set(), 0
        for start, end in _line_spans(data):
            key = _checked_key(data[start:end])
            if key is None:
                bad += 1
            elif key not in kept:  # the first line of a key wins, as in `put`
                kept.add(key)
                ptr = index.get(key)
                if ptr is None or ptr >> 72 == fid:
                    index[key] = _pack(fid, start, end - start)
        for key in [k for k, ptr in index.items() if ptr >> 72 == fid and k not in kept]:
            del index[key]  # a pass over the index, once per damaged file
        return len(kept), bad

    def refresh(self) -> None:
        """Index what other writers added since the last call: new live lines, new segments, and the good
        lines of segments moved aside."""
        with self._lock:
            self._scan_live()
            self._scan_segments()
            self._scan_damaged()

    def _scan_live(self) -> None:
        own = self._live.stem if self._live else None
        for stem in _stems(os.listdir(self._live_dir), ".jsonl"):
            if stem == own or stem in self._sealed or self._skip(stem):
                continue
            fid = self._others.get(stem)
            if fid is None:
                fid = self._others[stem] = self._add_file(f"{self._live_dir}/{stem}.jsonl", local=True)
            self._index_tail(fid)

    def _scan_segments(self) -> None:
        names = self._list(self._seg_dir)
        with_idx = set(_stems(names, ".idx"))
        new = [stem for stem in sorted(_stems(names, ".jsonl")) if stem not in self._sealed and not self._skip(stem)]
        sidecars = self._fetch([f"{stem}.idx" for stem in new if stem in with_idx and stem not in self._others])
        for stem in new:
            path = f"{self._seg_dir}/{stem}.jsonl"
            fid = self._others.pop(stem, None)
            if fid is not None:  # a live file we read in part: same bytes, so offsets still hold
                self._sealed.add(stem)
                self._files[fid].path, self._files[fid].local = path, self._local
                self._index_tail(fid)
                continue
            size = self._segment_size(stem)
            if size is None:  # moved aside since the listing: `_scan_damaged` finds it
                continue
            self._sealed.add(stem)
            fid = self._add_file(path, self._local)
            sidecar = sidecars.get(f"{stem}.idx")
            problem = None if sidecar is None else _idx_problem(sidecar, size)
            if sidecar is None:  # none yet (written first, so a listing race) or gone: read the lines
                self._index_tail(fid)
            elif problem is None:
                self._load_idx(fid, sidecar)
            else:
                self._quarantine(fid, problem)

    def _scan_damaged(self) -> None:
        """Index the good lines of the segments moved aside (by any reader) that this one has not indexed."""
        for stem in sorted(_stems(self._list(self._damaged_dir), ".jsonl")):
            if stem in self._sealed or self._skip(stem):
                continue
            self._sealed.add(stem)
            path = f"{self._damaged_dir}/{stem}.jsonl"
            fid = self._others.pop(stem, None)  # a live file we read in part, sealed and then moved aside
            if fid is None:
                fid = self._add_file(path, self._local)
            self._files[fid].path, self._files[fid].local = path, self._local
            self._reported.add(path)
            self._index_verified(fid)

    def _fetch(self, names: list[str]) -> dict[str, bytes]:
        """Whole files of the segment folder by name (those still there); an object store fetches them concurrently."""
        if not names:
            return {}
        if self._local:
            found = {name: read_local(f"{self._seg_dir}/{name}") for name in names}
            return {name: data for name, data in found.items() if data is not None}
        found = self.fs.cat([f"{self._seg_dir}/{name}" for name in names], on_error="omit")
        return {path.rsplit("/", 1)[-1]: data for path, data in found.items()}

    def _load_idx(self, fid: int, data: bytes) -> None:
        base, index = fid << 72, self._index
        for key, offset, length in _IDX_REC.iter_unpack(memoryview(data)[len(_IDX_MAGIC):]):
            if key not in index:
                index[key] = base | (offset << 32) | length  # `_pack`, inlined: 460k iterations

    def _segment_size(self, stem: str) -> int | None:
        if not self._local:
            return self._sizes.get(f"{stem}.jsonl")  # from the listing
        try:
            return os.stat(f"{self._seg_dir}/{stem}.jsonl").st_size
        except FileNotFoundError:
            return None

    def _index_tail(self, fid: int) -> None:
        """Index the complete lines past `consumed`; a half-written last line waits."""
        f = self._files[fid]
        try:
            data = self._read(f, f.consumed, None)
        except FileNotFoundError:  # sealed meanwhile; the segment listing picks it up
            return
        base, index = f.consumed, self._index
        for key, offset, length in _scan_lines(data):
            if key not in index:
                index[key] = _pack(fid, base + offset, length)
        f.consumed += data.rfind(b"\n") + 1

    def _read_at(self, ptr: int) -> bytes:
        offset, length = (ptr >> 32) & _OFF_MASK, ptr & _LEN_MASK
        return self._read(self._files[ptr >> 72], offset, offset + length)

    def _read(self, f: _File, start: int, end: int | None) -> bytes:
        if not f.local:
            try:
                return self.fs.cat_file(f.path, start=start or None, end=end)
            except OSError as exc:  # nothing past `start` (a live file read to its end, then sealed): a 416
                if end is None and exc.errno == errno.EINVAL:
                    return b""
                raise
        fd = os.open(f.path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size if end is None else end
            return os.pread(fd, size - start, start)
        finally:
            os.close(fd)

    def _list(self, directory: str) -> list[str]:
        """Names in a journal folder ([] if none); an object store's listing also gives the sizes (`_sizes`)."""
        if self._local:
            try:
                return os.listdir(directory)
            except FileNotFoundError:
                return []
        self.fs.invalidate_cache(directory)  # object-store listings are cached otherwise
        try:
            found = self.fs.ls(directory, detail=True)
        except FileNotFoundError:  # object stores have no empty folders
            return []
        names = [info["name"].rsplit("/", 1)[-1] for info in found]
        self._sizes.update((name, info["size"]) for name, info in zip(names, found) if name.endswith(".jsonl"))
        return names

    def _add_file(self, path: str, local: bool) -> int:
        self._files.append(_File(path, local))
        return len(self._files) - 1

    # -- container protocol --------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        return bytes.fromhex(key) in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _line(entry: JournalEntry) -> bytes:
    """One journal line: the entry's fields in order (so `key` comes first), as pydantic would write
    them, by orjson at a third of the cost, then their checksum. A `parsed` value that is not plain JSON
    goes through pydantic."""
    try:
        body = orjson.dumps(entry.__dict__, default=_plain, option=orjson.OPT_UTC_Z)
    except TypeError:
        body = _ENTRY.dump_json(entry)
    return b'%s%s%08x"}\n' % (body[:-1], _SUM_FIELD, zlib.crc32(body))


def _line_problem(line: bytes) -> str | None:
    """Why a line read back is not one that was written: cut short, or failing its checksum (the CRC-32 of
    the line without its checksum field). A line without one, written before checksums, passes."""
    if not line.endswith(b"\n"):
        return "a line cut short"
    tail = len(line) - _SUM_TAIL
    if tail > 0 and line.startswith(_SUM_FIELD, tail):
        crc = zlib.crc32(b"}", zlib.crc32(memoryview(line)[:tail]))
        if line[tail + len(_SUM_FIELD) : -3] != b"%08x" % crc:
            return "a line that fails its checksum"
    return None


def _entry_of(line: bytes | None, key: str) -> tuple[JournalEntry | None, str | None]:
    """The entry a line read for `key` holds, or why it cannot be used."""
    if line is None:
        return None, "its file is gone"
    problem = _line_problem(line)
    if problem is not None:
        return None, problem
    try:
        entry = JournalEntry.model_validate_json(line)
    except ValidationError:
        return None, "a line that does not parse"
    if entry.key != key:
        return None, f"the line of {key} holds {entry.key}"
    return entry, None


def _checked_key(line: bytes) -> bytes | None:
    """The key digest of a line that passes every check `get` makes, else None."""
    if _line_problem(line) is not None:
        return None
    try:
        return bytes.fromhex(JournalEntry.model_validate_json(line).key)
    except ValidationError:
        return None


def _line_spans(data: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each line, a last one without its newline included."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos) + 1 or len(data)
        yield pos, end
        pos = end


def _idx_problem(data: bytes, size: int) -> str | None:
    """Why a sidecar does not describe a segment of `size` bytes: its records end where the segment does
    (a segment holds exactly the lines its writer indexed), so a cut, emptied or grown segment shows here."""
    records = len(data) - len(_IDX_MAGIC)
    if not data.startswith(_IDX_MAGIC) or records % _IDX_REC.size:
        return "its sidecar index is not one"
    end = 0
    if records:
        _, offset, length = _IDX_REC.unpack_from(data, len(data) - _IDX_REC.size)
        end = offset + length
    if end != size:
        return f"its sidecar index ends at byte {end}, the segment at byte {size}"
    return None


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError


def _pack(fid: int, offset: int, length: int) -> int:
    return (fid << 72) | (offset << 32) | length


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """Write a whole line or none of it, so a failed put cannot leave half a line mid-file."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.ftruncate(fd, offset)
        raise


def _scan_lines(data: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(key digest, offset, length) of each complete line; a trailing half line is left out."""
    pos, end = 0, data.rfind(b"\n") + 1
    while pos < end:
        nl = data.index(b"\n", pos)
        key = _line_key(data, pos, nl)
        if key is not None:
            yield key, pos, nl + 1 - pos
        pos = nl + 1


def _line_key(data: bytes, start: int, end: int) -> bytes | None:
    if data.startswith(_KEY_PREFIX, start) and data[start + _KEY_END : start + _KEY_END + 1] == b'"':
        try:
            return binascii.unhexlify(data[start + len(_KEY_PREFIX) : start + _KEY_END])
        except binascii.Error:
            return None
    try:  # not our own serialisation (or damaged): parse it, skip it if that fails
        key = bytes.fromhex(orjson.loads(data[start:end])["key"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
    return key if len(key) == KEY_BYTES else None


def _build_idx(data: bytes) -> bytes:
    return b"".join(_IDX_REC.pack(*line) for line in _scan_lines(data))


def _lock_orphan(path: str) -> int | None:
    """An fd holding the lock of `path` if its writer is gone, else None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if not _same_file(fd, path):  # sealed by someone else while we opened it
        os.close(fd)
        return None
    return fd


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _stems(names: list[str], suffix: str) -> list[str]:
    return [n[: -len(suffix)] for n in names if n.endswith(suffix)]


def default_writer_id() -> str:
    """host-pid-random: unique to this process."""
    host = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()).strip("._") or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


