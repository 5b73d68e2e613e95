"""The LLM call journal: never pay twice (DESIGN principle 2, decision 4).

Every successful call is appended as one JSON line to this writer's *live* file before the call
counts as done. Every `seal_interval_s` (and at `seal()` / `close()`) the live file becomes an
immutable *segment* of the data dir with a binary sidecar index. The in-memory index maps a
16-byte key digest to one packed int (file id, offset, length); responses stay on disk.

Layout under ``<data_dir>/journal/``::

    live/<writer>-<seq>.jsonl      appended by one writer (remote data dirs: under `live_dir`)
    segments/<writer>-<seq>.jsonl  a sealed live file, byte for byte; never written again
    segments/<writer>-<seq>.idx    sidecar: magic, then (key digest, offset u64, length u32) records

A live file is named after the segment it becomes, so a reader that indexed part of it keeps its
offsets when it is sealed, and sealing an orphan twice writes the same bytes again.
Each live writer holds an exclusive `flock` on its live file; a live file nobody locks is an
orphan of a killed writer, which `recover()` seals (cut to its last complete line).
"""
from __future__ import annotations

import binascii
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import fsspec
import orjson
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, Field, TypeAdapter

from facets.storage.store import local_cache

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
        self._live: _Live | None = None
        self._seq: int | None = None
        self._closed = False
        self._lock = threading.RLock()
        os.makedirs(self._live_dir, exist_ok=True)
        self.fs.makedirs(self._seg_dir, exist_ok=True)
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
        names = os.listdir(self._live_dir) + self._list_segments()
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
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- reading -------------------------------------------------------------------------------

    def get(self, key: str) -> JournalEntry | None:
        with self._lock:
            if self._closed:
                raise JournalError("journal is closed")
            ptr = self._index.get(bytes.fromhex(key))
            if ptr is None:
                return None
            try:
                raw = self._read_at(ptr)
            except FileNotFoundError:  # another writer sealed that live file since our refresh
                self.refresh()
                raw = self._read_at(self._index[bytes.fromhex(key)])
        entry = JournalEntry.model_validate_json(raw)
        if entry.key != key:
            raise JournalError(f"index points at {entry.key} for {key}: journal files were changed")
        return entry

    def refresh(self) -> None:
        """Index what other writers added since the last call: new live lines, new segments."""
        with self._lock:
            self._scan_live()
            self._scan_segments()

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
        names = self._list_segments()
        with_idx = set(_stems(names, ".idx"))
        new = [stem for stem in sorted(_stems(names, ".jsonl")) if stem not in self._sealed and not self._skip(stem)]
        sidecars = self._fetch([f"{stem}.idx" for stem in new if stem in with_idx and stem not in self._others])
        for stem in new:
            self._sealed.add(stem)
            path = f"{self._seg_dir}/{stem}.jsonl"
            fid = self._others.pop(stem, None)
            if fid is not None:  # a live file we read in part: same bytes, so offsets still hold
                self._files[fid].path, self._files[fid].local = path, self._local
                self._index_tail(fid)
            elif not self._load_idx(path, sidecars.get(f"{stem}.idx", b"")):
                self._index_tail(self._add_file(path, self._local))

    def _fetch(self, names: list[str]) -> dict[str, bytes]:
        """Whole files of the segment folder by name; an object store fetches them concurrently."""
        if not names:
            return {}
        if self._local:
            return {name: _read_file(f"{self._seg_dir}/{name}") for name in names}
        found = self.fs.cat([f"{self._seg_dir}/{name}" for name in names], on_error="omit")
        return {path.rsplit("/", 1)[-1]: data for path, data in found.items()}

    def _load_idx(self, path: str, data: bytes) -> bool:
        body = memoryview(data)[len(_IDX_MAGIC):]
        if not data.startswith(_IDX_MAGIC) or len(body) % _IDX_REC.size:
            return False
        base, index = self._add_file(path, self._local) << 72, self._index
        for key, offset, length in _IDX_REC.iter_unpack(body):
            if key not in index:
                index[key] = base | (offset << 32) | length  # `_pack`, inlined: 460k iterations
        return True

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

    def _list_segments(self) -> list[str]:
        if self._local:
            return os.listdir(self._seg_dir)
        self.fs.invalidate_cache(self._seg_dir)  # object-store listings are cached otherwise
        try:
            paths = self.fs.ls(self._seg_dir, detail=False)
        except FileNotFoundError:  # object stores have no empty folders
            return []
        return [p.rsplit("/", 1)[-1] for p in paths]

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
    them, by orjson at a third of the cost. A `parsed` value that is not plain JSON goes through pydantic."""
    try:
        return orjson.dumps(entry.__dict__, default=_plain, option=orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return _ENTRY.dump_json(entry) + b"\n"


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    raise TypeError


def _pack(fid: int, offset: int, length: int) -> int:
    return (fid << 72) | (offset << 32) | length


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


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


