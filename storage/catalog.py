"""DuckDB over the data directory: a view per stage table and per release, and the anti-join.

DuckDB's httpfs extension downloads itself at first use, so object stores are reached through the
store's own fsspec filesystem registered with DuckDB (decision 5).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import duckdb
import pyarrow as pa

from facets.schemas import arrow_schema
from facets.storage.stages import TABLE_MODELS
from facets.storage.store import Store, is_parquet_file

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class Catalog:
    def __init__(self, store: Store):
        self.store = store
        self.con = duckdb.connect()
        if not store.is_local:
            self.con.register_filesystem(store.fs)
        self.refresh()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def _view(self, name: str, files: list[str], schema: pa.Schema | None) -> None:
        if not _IDENT.match(name):
            raise ValueError(f"not a usable view name: {name!r}")
        if files:
            listing = ", ".join("'" + self.store.uri_of(f).replace("'", "''") + "'" for f in files)
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet([{listing}], union_by_name=true)")
        elif schema is not None:
            self.con.register(f"_empty_{name}", schema.empty_table())
            self.con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM _empty_{name}")

    def refresh(self) -> None:
        """(Re)create the views, picking up files written since the connection opened."""
        for table, model in TABLE_MODELS.items():
            self._view(table, self.store.whole(self.store.files(table)), arrow_schema(model))  # cut files moved aside
        for version, name, files in self.release_tables():
            self._view(f"release_{_ident(name)}", files, None)
            self._view(f"release_{_ident(version)}_{_ident(name)}", files, None)

    def release_tables(self) -> list[tuple[str, str, list[str]]]:
        """(version, name, files) of every release table, the newest version last.

        One recursive listing of `releases/` (a few LIST requests on an object store, whatever the
        number of versions), grouped by releases/<version>/<name>/[<split>/]<file>.parquet."""
        releases = self.store.path("releases")
        try:
            paths = self.store.fs.find(releases)
        except FileNotFoundError:
            return []
        tables: dict[tuple[str, str], list[str]] = {}
        for path in paths:
            parts = path[len(releases):].strip("/").split("/")
            if len(parts) in (3, 4) and is_parquet_file(path) and not any(p.startswith(".") for p in parts):
                tables.setdefault((parts[0], parts[1]), []).append(path)
        latest = self._latest()
        found = [(version, name, sorted(files)) for (version, name), files in tables.items()]
        return sorted(found, key=lambda t: (t[0] == latest, t[0]))

    def _latest(self) -> str | None:
        text = self.store.read_text("releases", "LATEST")
        return text.strip() if text else None

    def sql(self, query: str, params: Sequence[object] | None = None) -> duckdb.DuckDBPyRelation:
        return self.con.sql(query, params=params)

    def missing(self, table: str, keys: pa.Table | Sequence[str], on: str = "fingerprint") -> pa.Table:
        """The keys (rows of `keys`) with no row in `table` matching on column `on`: an anti-join."""
        if table not in TABLE_MODELS:
            raise KeyError(f"unknown table {table!r}")
        if not isinstance(keys, pa.Table):
            keys = pa.table({on: pa.array(list(keys), pa.string())})
        self.con.register("_wanted", keys)
        try:
            return self.con.sql(f'SELECT w.* FROM _wanted w ANTI JOIN {table} t ON w."{on}" = t."{on}"').to_arrow_table()
        finally:
            self.con.unregister("_wanted")


def _ident(version: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", version)
