"""Scratch folders of work in progress (a release being staged, DuckDB's spill), and the sweep that removes
what dead writers left behind: their scratch folders and their temporary files.

Each scratch folder `<root>/<kind>-<hex>` has a lock file `<root>/<kind>-<hex>.lock` beside it, which its
writer holds (`flock`) while it works. The kernel lets go of the lock when the writer dies, kill -9
included, so a lock the sweep can take marks a folder whose writer is gone; a live writer's is never
touched. A folder without a lock file (made before locks, or a bench release's) goes only when a day old.
A temporary file of a single write (`.name.tmp`, renamed into place when whole) has no lock: it goes
when an hour old, which no one write takes.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass

from facets.storage.store import Store, local_cache

UNLOCKED_FOLDER_AGE_S = 24 * 3600
TEMP_FILE_AGE_S = 3600
# where single writes leave `.tmp` files: the stage and failure tables, and releases/ (LATEST)
TEMP_FILE_DIRS = ("stages/*", "failures", "releases")
log = logging.getLogger(__name__)


@dataclass
class Scratch:
    """A scratch folder and the lock that marks its writer alive; `close` removes both."""

    path: str
    lock_fd: int

    def close(self) -> None:
        if self.lock_fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)  # gone already when it became a release
        try:
            os.unlink(f"{self.path}.lock")
        except FileNotFoundError:
            pass
        os.close(self.lock_fd)
        self.lock_fd = -1

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scratch_root(store: Store) -> str:
    """The data dir's own disk when local (a staged release then moves into place in one rename), outside
    `releases/` so the catalog never sees it; this machine's cache folder for an object store's data dir."""
    return store.path(".staging") if store.is_local else local_cache(store.uri, "staging")


def open_scratch(store: Store, kind: str) -> Scratch:
    """A fresh, locked scratch folder `<kind>-<hex>` of `store`."""
    root = scratch_root(store)
    while True:
        path = f"{root}/{kind}-{uuid.uuid4().hex}"
        os.makedirs(root, exist_ok=True)
        try:
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileNotFoundError:  # a sweep removed the empty root meanwhile
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, f"{path}.lock"):  # else a sweep took the lock file for a dead writer's in between
            break
        os.close(fd)
    os.makedirs(path)
    return Scratch(path, fd)


def sweep(store: Store) -> int:
    """Remove the scratch folders of dead writers, and stale temporary files of a local data dir; returns
    how many things were removed."""
    removed = sweep_scratch(scratch_root(store))
    if store.is_local:
        removed += sweep_temp_files(store)
    if removed:
        log.info("removed %d leftovers of interrupted writers from %s", removed, store.uri)
    return removed


def sweep_scratch(root: str) -> int:
    try:
        names = os.listdir(root)
    except (FileNotFoundError, NotADirectoryError):
        return 0
    locked = {name.removesuffix(".lock") for name in names if name.endswith(".lock")}
    removed = sum(_remove_if_dead(root, stem) for stem in locked)
    for name in set(names) - locked:
        path = f"{root}/{name}"
        if not name.endswith(".lock") and os.path.isdir(path) and _age(path) > UNLOCKED_FOLDER_AGE_S:
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    try:
        os.rmdir(root)  # only when empty
    except OSError:
        pass
    return removed


def sweep_temp_files(store: Store) -> int:
    removed = 0
    for pattern in TEMP_FILE_DIRS:
        for directory in _expand(store.path(*pattern.split("/"))):
            try:
                names = os.listdir(directory)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                path = f"{directory}/{name}"
                if name.endswith(".tmp") and os.path.isfile(path) and _age(path) > TEMP_FILE_AGE_S:
                    try:
                        os.unlink(path)
                        removed += 1
                    except FileNotFoundError:
                        pass
    return removed


def _remove_if_dead(root: str, stem: str) -> bool:
    """Remove `stem` and its lock when nobody holds the lock (its writer is gone)."""
    lock = f"{root}/{stem}.lock"
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:  # its writer finished meanwhile
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live writer
        if not _same_file(fd, lock):
            return False  # another sweep removed it meanwhile
        shutil.rmtree(f"{root}/{stem}", ignore_errors=True)
        os.unlink(lock)
        return True
    finally:
        os.close(fd)


def _expand(path: str) -> list[str]:
    if not path.endswith("/*"):
        return [path]
    parent = path[:-2]
    try:
        return [f"{parent}/{name}" for name in os.listdir(parent)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False
