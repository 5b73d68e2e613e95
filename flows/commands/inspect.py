"""`facets inspect "SQL"`: DuckDB over a data dir; one view per stage, `failures`, and `release_<name>`."""
from __future__ import annotations

import argparse
import sys

import duckdb


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sql", help='e.g. "select main_source, count(*) from instructions group by 1"')
    parser.add_argument("--data-dir", default="data", help="data directory (default ./data)")
    parser.add_argument("--max-rows", type=int, default=40, help="rows to print at most (default 40)")


def run(args: argparse.Namespace) -> int:
    import polars as pl

    from facets.flows.commands.status import missing_data_dir
    from facets.storage import Catalog, Store

    store = Store(args.data_dir)
    missing = missing_data_dir(store)
    if missing:
        print(f"facets inspect: error: {missing}", file=sys.stderr)
        return 2
    with Catalog(store) as catalog:
        try:
            relation = catalog.sql(args.sql)
        except duckdb.Error as exc:
            views = ", ".join(sorted(r[0] for r in catalog.sql("select view_name from duckdb_views() where not internal").fetchall()))
            print(f"facets inspect: {exc}\n(views: {views})", file=sys.stderr)
            return 2
        if relation is None:
            return 0
        with pl.Config(tbl_rows=args.max_rows, fmt_str_lengths=80, tbl_width_chars=160):
            print(relation.pl())
    return 0
