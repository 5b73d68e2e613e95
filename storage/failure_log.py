"""Failures kept as they happen (docs/ARCHITECTURE.md, "Nothing lost").

A stage writes its failures to ``failures/*.parquet`` when it ends; until then each failure is appended to a
live file of this process as it happens, so an early stop, a crash or a kill -9 loses none. A stage's end
writes what it holds to Parquet and empties the file; the next build writes the files whose process is gone
(nobody holds their lock) and removes them. Live files sit beside the data dir when it is local, in this
machine's cache folder for the data dir otherwise (as the journal's live files do).
"""
from __future__ import annotations

import fcntl
import logging
import os

from facets.schemas import Failure
from facets.storage.store import Store, local_cache, new_writer_id

log = logging.getLogger(__name__)


def live_dir(store: Store) -> str:
    if store.is_local:
        return store.path("failures", "live")
    return local_cache(store.uri, "failures-live")


class FailureLog:
    """One live file of failures, appended to by one process, locked while it is open."""

    def __init__(self, store: Store, name: str):
        self.store = store
        directory = live_dir(store)
        os.makedirs(directory, exist_ok=True)
        self.path = f"{directory}/{name}-{new_writer_id()}.jsonl"
        self._fd: int | None = None
        self.pending = 0

    def add(self, failure: Failure) -> None:
        """In the OS (safe from kill -9) when this returns."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, failure.model_dump_json().encode() + b"\n")
        self.pending += 1

    def written(self) -> None:
        """Everything added so far is in Parquet now: start the file again."""
        if self._fd is not None and self.pending:
            os.ftruncate(self._fd, 0)
        self.pending = 0

    def close(self) -> None:
        if self._fd is None:
            return
        empty = os.fstat(self._fd).st_size == 0
        os.close(self._fd)
        self._fd = None
        if empty:
            os.unlink(self.path)


def recover_failures(store: Store) -> int:
    """Write the live failure files of processes that are gone to Parquet; returns how many failures."""
    directory = live_dir(store)
    if not os.path.isdir(directory):
        return 0
    recovered = 0
    for name in sorted(os.listdir(directory)):
        if name.endswith(".jsonl"):
            recovered += _recover(store, f"{directory}/{name}")
    if recovered:
        log.warning("kept %d failures that a stopped build had not written yet (in %s)", recovered,
                    store.path("failures"))
    return recovered


def _recover(store: Store, path: str) -> int:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its process is alive
        data = os.pread(fd, os.fstat(fd).st_size, 0)
        failures = [failure for line in data.splitlines() if (failure := _parsed(line)) is not None]
        if failures:
            store.write_failures(failures, label="recovered")
        os.unlink(path)
        return len(failures)
    finally:
        os.close(fd)


def _parsed(line: bytes) -> Failure | None:
    """None for the half line a killed writer may leave."""
    try:
        return Failure.model_validate_json(line)
    except ValueError:
        return None
