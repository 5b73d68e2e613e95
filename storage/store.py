"""The data directory: immutable Parquet files per stage, written atomically, read as Arrow or Polars.

Layout (docs/ARCHITECTURE.md): stages/<stage>/*.parquet, failures/*.parquet, releases/<version>/<name>/*.parquet.
The root is a local path or an fsspec URI. A file is never appended to in place (decision 5): a local
write goes to a hidden temporary name and is renamed; an object store gets one PUT per file.

A file that cannot be read (cut, emptied, garbled on disk) is moved to damaged/<the same path>, never
deleted, and named in one warning; its rows are then missing, so a build makes them again (from the
journal when they were paid for). A read that fails looks for such files; a local listing taken with
`whole` finds cut ones at the cost of reading each file's last 8 bytes.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import socket
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import fsspec
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from facets.schemas import arrow_schema, to_table
from facets.storage.stages import FAILURES, model_of

PARQUET_OPTIONS = {"compression": "zstd"}
DAMAGED = "damaged"
# what reading a damaged file raises: ArrowInvalid (no footer, bad metadata), OSError (corrupt pages)
READ_ERRORS = (pa.ArrowException, OSError)
T = TypeVar("T")
log = logging.getLogger(__name__)
# Object stores: no cached listings. Other workers add files at any time, and a cached listing (s3fs
# keeps one per folder) would hide them: a stage would be computed twice, a release seen as missing.
REMOTE_OPTIONS = {"use_listings_cache": False}


def open_fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path) of a local path or fsspec URI. Endpoints and credentials come the standard
    way: `AWS_ENDPOINT_URL` and the AWS variables for s3://, or fsspec's config (`FSSPEC_S3_ENDPOINT_URL`)."""
    if fsspec.utils.get_protocol(uri) in ("file", "local"):
        return fsspec.core.url_to_fs(uri)
    return fsspec.core.url_to_fs(uri, **REMOTE_OPTIONS)


def local_cache(uri: str, kind: str) -> str:
    """This machine's folder for a data dir's `kind` of local files (a journal's live files, a copy of its
    tables), the same for the same data dir every time: FACETS_CACHE_DIR, else XDG_CACHE_HOME/facets,
    else ~/.cache/facets, then `kind` and a digest of the data dir's URI."""
    base = os.environ.get("FACETS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "facets")
    return os.path.join(base, kind, hashlib.blake2b(uri.encode(), digest_size=8).hexdigest())


def new_writer_id() -> str:
    """Unique per process, so several processes can write one stage without colliding."""
    host = socket.gethostname().split(".")[0].replace("-", "")[:16] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def read_local(path: str) -> bytes | None:
    """A whole local file, None when there is none."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def move_file(fs: fsspec.AbstractFileSystem, source: str, target: str) -> bool:
    """Move `source` to `target` (a rename on a local disk), making the target's folder; False when
    `source` is gone already (another process moved it first)."""
    try:
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        if isinstance(fs, LocalFileSystem):
            os.rename(source, target)
        else:
            fs.mv(source, target)
    except FileNotFoundError:
        return False
    return True


class Store:
    def __init__(self, root: str | os.PathLike[str], writer_id: str | None = None):
        self.uri = str(root)
        self.fs, self.root = open_fs(self.uri)
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.writer_id = writer_id or new_writer_id()
        self._sequence = itertools.count()

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def table_dir(self, table: str) -> str:
        return self.path(table) if table == FAILURES else self.path("stages", table)

    # -- writing -------------------------------------------------------------------------------
    def write(self, table: str, rows: Iterable[BaseModel], label: str = "part") -> str | None:
        """Append a validated batch to a stage table as one new Parquet file; returns its path."""
        model = model_of(table)
        rows = list(rows)
        bad = [r for r in rows if not isinstance(r, model)]
        if bad:
            raise TypeError(f"{table} holds {model.__name__} rows, got {type(bad[0]).__name__}")
        if not rows:
            return None
        return self.write_table(self.table_dir(table), to_table(rows, model), label)

    def write_failures(self, failures: Sequence[BaseModel], label: str = "part") -> str | None:
        return self.write(FAILURES, failures, label)

    def write_table(self, directory: str, table: pa.Table, label: str = "part",
                    row_group_size: int | None = None) -> str:
        # the random tail keeps two stores given the same writer id (a restarted worker) from replacing
        # each other's files: a rename or a PUT onto an existing name would lose rows without a word
        name = f"{label}-{self.writer_id}-{next(self._sequence):06d}-{uuid.uuid4().hex[:8]}.parquet"
        path = f"{directory}/{name}"
        self.fs.makedirs(directory, exist_ok=True)
        if self.is_local:
            temporary = f"{directory}/.{name}.tmp"
            pq.write_table(table, temporary, row_group_size=row_group_size, **PARQUET_OPTIONS)
            os.replace(temporary, path)
        else:
            buffer = io.BytesIO()
            pq.write_table(table, buffer, row_group_size=row_group_size, **PARQUET_OPTIONS)
            self.fs.pipe_file(path, buffer.getvalue())
        return path

    def write_text(self, text: str, *parts: str) -> str:
        """A small text file (a summary, a pointer) replaced whole: a rename locally, one PUT remotely."""
        path = self.path(*parts)
        directory = path.rsplit("/", 1)[0]
        self.fs.makedirs(directory, exist_ok=True)
        if self.is_local:
            temporary = f"{directory}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex[:8]}.tmp"
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(temporary, path)
        else:
            self.fs.pipe_file(path, text.encode())
        return path

    # -- reading -------------------------------------------------------------------------------
    def files(self, table: str) -> list[str]:
        return self.parquet_files(self.table_dir(table))

    def parquet_files(self, directory: str) -> list[str]:
        try:  # one listing (one LIST request on an object store, which has no folders to test for)
            paths = self.fs.ls(directory, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(p for p in paths if is_parquet_file(p))

    def names(self, *parts: str) -> list[str]:
        """The names in a folder as it is now (no cached listing), [] when there is none."""
        directory = self.path(*parts)
        self.fs.invalidate_cache(directory)
        try:
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(directory, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def uri_of(self, path: str) -> str:
        """A path of this store as others open it: local as is, remote with its protocol (s3://...)."""
        return path if self.is_local else self.fs.unstrip_protocol(path)

    def read_text(self, *parts: str) -> str | None:
        """A small file's text (LATEST, a manifest), None when it is not there."""
        try:
            return self.fs.cat_file(self.path(*parts)).decode()
        except FileNotFoundError:
            return None

    def read(self, table: str, columns: list[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """A whole stage as one Arrow table (empty, with the stage's schema, when nothing is written)."""
        schema = arrow_schema(model_of(table))

        def read(files: list[str]) -> pa.Table:
            if not files:
                empty = schema.empty_table()
                return empty.select(columns) if columns else empty
            dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
            return dataset.to_table(columns=columns, filter=filter)

        return self.read_files(self.files(table), read)

    def read_files(self, files: list[str], read: Callable[[list[str]], T]) -> T:
        """`read(files)`; should it fail, the files that `read` cannot read alone are moved aside
        (`move_aside`) and it reads the others. A sound read costs nothing more."""
        try:
            return read(files)
        except READ_ERRORS:
            readable = [f for f in files if self._readable(f, read)]
            if len(readable) == len(files):
                raise  # not a damaged file
        return read(readable)

    def _readable(self, path: str, read: Callable[[list[str]], object]) -> bool:
        try:
            read([path])
        except FileNotFoundError:  # moved aside by another reader since the listing
            return False
        except READ_ERRORS as exc:
            if not self.is_local and not isinstance(exc, pa.ArrowInvalid):
                raise  # an object store's I/O error may pass: only bytes that do not decode move a file
            self.move_aside(path, _one_line(exc))
            return False
        return True

    def whole(self, files: list[str]) -> list[str]:
        """`files` less those cut or emptied, which are moved aside: a Parquet file ends in its footer's
        length and `PAR1`. Locally that is one 8-byte read a file; an object store's files are written
        in one PUT and checked when a read fails."""
        if not self.is_local:
            return files
        return [f for f in files if self._has_footer(f)]

    def _has_footer(self, path: str) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, 8, size - 8) if size >= 12 else b""
        finally:
            os.close(fd)
        if tail[4:] == b"PAR1" and int.from_bytes(tail[:4], "little") + 12 <= size:
            return True
        self.move_aside(path, f"{size} bytes that do not end in a Parquet footer")
        return False

    def move_aside(self, path: str, problem: str) -> bool:
        """Move a file that cannot be read to damaged/ under its own path there, never deleting it, and say
        so in one line; False when it is gone already (another reader moved it)."""
        root = self.root.rstrip("/") + "/"
        relative = path[len(root):] if path.startswith(root) else path.rsplit("/", 1)[-1]
        target = self.path(DAMAGED, relative)
        if not move_file(self.fs, path, target):
            return False
        log.warning("%s cannot be read (%s): moved to %s; its rows are made again", self.uri_of(path), problem,
                    self.uri_of(target))
        return True

    def damaged(self, table: str) -> list[str]:
        """Names of the files of `table` moved aside (`move_aside`)."""
        relative = self.table_dir(table)[len(self.root.rstrip("/")) + 1:]
        return self.names(DAMAGED, *relative.split("/"))

    def read_polars(self, table: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.from_arrow(self.read(table, columns))

    def count(self, table: str) -> int:
        def count(files: list[str]) -> int:
            return ds.dataset(files, format="parquet", filesystem=self.fs).count_rows() if files else 0

        return self.read_files(self.files(table), count)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(error).__name__


def is_parquet_file(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".parquet") and not name.startswith(".")


def dataset_arguments(directory: str) -> dict:
    """Keyword arguments of `datasets.load_dataset("parquet", **them)` for one release subset folder.

    A local folder is a `data_dir`. `datasets` takes no remote `data_dir`, so an s3:// folder is given
    as split patterns (`train-*.parquet`, `test-*.parquet`), read through fsspec with the same endpoint
    settings as ours."""
    if fsspec.utils.get_protocol(directory) in ("file", "local"):
        return {"data_dir": directory}
    fs, path = open_fs(directory)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if is_parquet_file(p)]
    splits = sorted({name.split("-", 1)[0] for name in names})
    return {"data_files": {split: f"{directory.rstrip('/')}/{split}-*.parquet" for split in splits}}


def dataset_call(directory: str) -> str:
    """The arguments of `dataset_arguments` as Python source, for the hints the CLI prints."""
    return ", ".join(f"{name}={value!r}" for name, value in dataset_arguments(directory).items())
