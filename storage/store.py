"""The data directory: immutable Parquet files per stage, written atomically, read as Arrow or Polars.

Layout (DESIGN.md): stages/<stage>/*.parquet, failures/*.parquet, releases/<version>/<name>/*.parquet.
The root is a local path or an fsspec URI. A file is never appended to in place (decision 5): a local
write goes to a hidden temporary name and is renamed; an object store gets one PUT per file.
"""
from __future__ import annotations

import io
import itertools
import os
import socket
import uuid
from collections.abc import Iterable, Sequence

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


def new_writer_id() -> str:
    """Unique per process, so several processes can write one stage without colliding."""
    host = socket.gethostname().split(".")[0].replace("-", "")[:16] or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class Store:
    def __init__(self, root: str | os.PathLike[str], writer_id: str | None = None):
        self.uri = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
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

    def write_table(self, directory: str, table: pa.Table, label: str = "part") -> str:
        # the random tail keeps two stores given the same writer id (a restarted worker) from replacing
        # each other's files: a rename or a PUT onto an existing name would lose rows without a word
        name = f"{label}-{self.writer_id}-{next(self._sequence):06d}-{uuid.uuid4().hex[:8]}.parquet"
        path = f"{directory}/{name}"
        self.fs.makedirs(directory, exist_ok=True)
        if self.is_local:
            temporary = f"{directory}/.{name}.tmp"
            pq.write_table(table, temporary, **PARQUET_OPTIONS)
            os.replace(temporary, path)
        else:
            buffer = io.BytesIO()
            pq.write_table(table, buffer, **PARQUET_OPTIONS)
            self.fs.pipe_file(path, buffer.getvalue())
        return path

    # -- reading -------------------------------------------------------------------------------
    def files(self, table: str) -> list[str]:
        return self.parquet_files(self.table_dir(table))

    def parquet_files(self, directory: str) -> list[str]:
        if not self.fs.exists(directory):
            return []
        return sorted(p for p in self.fs.glob(f"{directory}/*.parquet") if not p.rsplit("/", 1)[-1].startswith("."))

    def read(self, table: str, columns: list[str] | None = None, filter: ds.Expression | None = None) -> pa.Table:
        """A whole stage as one Arrow table (empty, with the stage's schema, when nothing is written)."""
        schema = arrow_schema(model_of(table))
        files = self.files(table)
        if not files:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        dataset = ds.dataset(files, schema=schema, format="parquet", filesystem=self.fs)
        return dataset.to_table(columns=columns, filter=filter)

    def read_polars(self, table: str, columns: list[str] | None = None) -> pl.DataFrame:
        return pl.from_arrow(self.read(table, columns))

    def count(self, table: str) -> int:
        files = self.files(table)
        if not files:
            return 0
        return ds.dataset(files, format="parquet", filesystem=self.fs).count_rows()

    def catalog(self):
        """A DuckDB connection with one view per stage, per release, and `failures`."""
        from facets.storage.catalog import Catalog

        return Catalog(self)
