"""`facets ingest`: read instruction sources into the `instructions` stage of a data directory."""
from __future__ import annotations

import argparse
import sys

from facets.ingest.filters import DEFAULT_MAX_CHARS
from facets.ingest.pool import IngestError, IngestSummary, ingest
from facets.ingest.sources import DEFAULT_TEXT_COLUMNS, HUB_DEFAULTS, MAIN_SOURCES, SourceError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source", action="append", default=[], metavar="NAME=PATH_OR_HUB_ID", required=True,
        help=f"a source to read (repeatable). NAME is one of {', '.join(MAIN_SOURCES)} or a name of your own; "
             "the location is a .jsonl/.json/.parquet/.csv file, a directory of them, or a hub id owner/name[:split]. "
             f"NAME alone streams the default hub dataset ({', '.join(HUB_DEFAULTS)})",
    )
    parser.add_argument("--data-dir", default="data", help="data directory, a path or fsspec URI (default: ./data)")
    parser.add_argument("--limit", type=int, default=None, help="keep at most N instructions, drawn in seeded order")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw order for --limit and --quota")
    parser.add_argument("--quota", action="append", default=[], type=_quota, metavar="NAME=N",
                        help="keep at most N instructions of source NAME (repeatable)")
    parser.add_argument("--text-column", default=None,
                        help=f"text column of your own sources (default: the first of {', '.join(DEFAULT_TEXT_COLUMNS)}, "
                             "or a turns list)")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS,
                        help=f"drop instructions longer than this (default: {DEFAULT_MAX_CHARS})")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes that read large files (default: one per CPU, at most 4; "
                             "1 reads in this process)")


def _quota(value: str) -> tuple[str, int]:
    name, _, count = value.partition("=")
    if not name or not count.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=N with N >= 0, got {value!r}")
    return name.strip(), int(count)


def run(args: argparse.Namespace) -> int:
    try:
        summary = ingest(
            args.data_dir, args.source, limit=args.limit, seed=args.seed, quotas=dict(args.quota),
            max_chars=args.max_chars, text_column=args.text_column, workers=args.workers,
        )
    except (SourceError, IngestError, OSError) as error:
        print(f"facets ingest: error: {error}", file=sys.stderr)
        return 2
    _warn_failures(summary)
    print(summary.table())
    print(f"\n{summary.kept} new instructions in {len(summary.files)} file(s) under {args.data_dir}/stages/instructions"
          + (f"; {summary.failures} unreadable rows in {args.data_dir}/failures" if summary.failures else ""))
    return 0


def _warn_failures(summary: IngestSummary) -> None:
    """Rows that went to `failures` are named on stderr, one line each, so that none passes unseen."""
    for line in summary.first_failures:
        print(f"facets ingest: warning: {line}", file=sys.stderr)
    more = summary.failures - len(summary.first_failures)
    if more > 0:
        print(f"facets ingest: warning: {more} more unreadable rows, see the failures table", file=sys.stderr)
