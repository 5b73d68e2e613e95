"""The ingest stage: read the sources, apply the paper's rules, deduplicate, select, write `instructions`.

Order of decisions for every row, each counted by reason in the summary:
1. a row that cannot be mapped goes to `failures` (tasks/sources.py has the bad-input policy);
2. the rules of tasks/filters.py (multi-turn, not English, empty, too long, role-play preamble);
3. exact duplicates on the normalised text, i.e. on the instruction id: sources are read in a fixed
   priority (`sources.ordered`), so the first source in that order keeps a shared instruction whatever
   the order of the flags, and within a source the first row wins;
4. seeded selection: `--quota NAME=N` keeps a source's N candidates of lowest `seeded_rank`, then
   `--limit N` keeps the N lowest of what is left. Rank is a hash of (seed, id), so the choice does not
   depend on file order and a larger N keeps a superset of a smaller one. The limit counts instructions
   already in the data directory, so re-running with a larger limit adds only the difference;
5. ids already in the data directory are not written again (a DuckDB anti-join per output file).

Memory stays flat in the number of rows read: rows stream through, dedup keeps one integer per kept
instruction, output leaves in files of `rows_per_file` rows, and only a selection (--limit / --quota)
holds its N chosen candidates. Rows are built column-wise with the functions `Instruction.from_text`
uses; the model validates the first row of every file as a guard against the two drifting apart.
"""
from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa

from facets.schemas import Failure, Instruction, arrow_schema, bucket_of, from_table, instruction_id
from facets.storage import Catalog, Store
from facets.tasks.filters import DEFAULT_MAX_CHARS, drop_reason
from facets.tasks.sources import RAW_CHARS, RowError, Source, ordered, parse_source

STAGE = "instructions"
ROWS_PER_FILE = 50_000
# Summary columns in the order a row meets them; failure reasons follow alphabetically.
REASON_ORDER = ("multi_turn", "not_english", "empty", "too_long", "role_play", "duplicate", "over_quota",
                "over_limit", "already_ingested")


class IngestError(Exception):
    """Options that cannot work together; the message is one line."""


class Pick(NamedTuple):
    source: str
    id: str
    text: str
    main_source: str
    original_source: str


@dataclass
class Tally:
    kept: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def read(self) -> int:
        return self.kept + sum(self.dropped.values())


@dataclass
class IngestSummary:
    tallies: dict[str, Tally]
    files: list[str] = field(default_factory=list)
    failures: int = 0

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tallies.values())

    def table(self) -> str:
        """Kept and dropped per source and reason, only the reasons that occurred."""
        seen = {r for t in self.tallies.values() for r, n in t.dropped.items() if n}
        reasons = [r for r in REASON_ORDER if r in seen] + sorted(seen - set(REASON_ORDER))
        total = Tally(sum(t.kept for t in self.tallies.values()),
                      sum((t.dropped for t in self.tallies.values()), Counter()))
        lines = [["source", "read", "kept", *reasons]]
        for name, tally in [*self.tallies.items(), ("total", total)]:
            lines.append([name, tally.read, tally.kept, *(tally.dropped[r] for r in reasons)])
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
        return "\n".join(
            "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in lines
        )


def seeded_rank(iid: str, seed: int) -> int:
    """Draw order of an instruction under a seed: lower ranks are drawn first."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{iid}".encode(), digest_size=8).digest(), "big")


def _dedup_key(iid: str) -> int:
    """Ids end in a hex digest; as an int it takes half the memory of the string."""
    return int(iid.rpartition("-")[2], 16)


class LowestRanks:
    """The n picks of lowest (seeded rank, id): a max-heap of size n."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.heap: list[tuple[int, int, Pick]] = []

    def offer(self, pick: Pick) -> Pick | None:
        """Keep `pick` if it ranks among the n lowest; return whichever pick falls out."""
        entry = (-seeded_rank(pick.id, self.seed), -_dedup_key(pick.id), pick)
        if len(self.heap) < self.n:
            heapq.heappush(self.heap, entry)
            return None
        if self.n == 0 or entry <= self.heap[0]:
            return pick
        return heapq.heappushpop(self.heap, entry)[2]

    def picks(self) -> list[Pick]:
        return [entry[2] for entry in sorted(self.heap, reverse=True)]


class InstructionWriter:
    """Buffers picks and writes each full buffer, minus ids already stored, as one Parquet file."""

    def __init__(self, store: Store, catalog: Catalog, summary: IngestSummary, rows_per_file: int):
        self.store, self.catalog, self.summary, self.rows_per_file = store, catalog, summary, rows_per_file
        self.buffer: list[Pick] = []

    def add(self, pick: Pick) -> None:
        self.buffer.append(pick)
        if len(self.buffer) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        picks, self.buffer = self.buffer, []
        if not picks:
            return
        new_ids = set(self.catalog.missing(STAGE, [p.id for p in picks], on="id").column("id").to_pylist())
        fresh = []
        for pick in picks:
            tally = self.summary.tallies[pick.source]
            if pick.id in new_ids:
                tally.kept += 1
                fresh.append(pick)
            else:
                tally.dropped["already_ingested"] += 1
        if fresh:
            table = _instruction_table(fresh)
            from_table(table.slice(0, 1), Instruction)
            self.summary.files.append(self.store.write_table(self.store.table_dir(STAGE), table, label="ingest"))


def _instruction_table(picks: list[Pick]) -> pa.Table:
    _, ids, texts, main_sources, original_sources = zip(*picks)
    return pa.table(
        {
            "id": ids,
            "bucket": [bucket_of(i) for i in ids],
            "text": texts,
            "main_source": main_sources,
            "original_source": original_sources,
            "metadata": [[]] * len(picks),
        },
        schema=arrow_schema(Instruction),
    )


class FailureLog:
    """Rows that could not be mapped, written to `failures` in bounded batches."""

    def __init__(self, store: Store, summary: IngestSummary, rows_per_file: int):
        self.store, self.summary, self.rows_per_file = store, summary, rows_per_file
        self.buffer: list[Failure] = []

    def add(self, source: str, origin: str, number: int, error: RowError, raw: bytes | None) -> None:
        self.buffer.append(Failure(
            stage="ingest", key=origin, reason=error.reason, detail=str(error), source=source, row=number,
            raw_output=(raw or b"").decode("utf-8", errors="replace")[:RAW_CHARS],
        ))
        if len(self.buffer) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        failures, self.buffer = self.buffer, []
        if failures:
            self.store.write_failures(failures, label="ingest")
            self.summary.failures += len(failures)


def ingest(
    data_dir: str | Store,
    sources: Sequence[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    quotas: Mapping[str, int] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    text_column: str | None = None,
    rows_per_file: int = ROWS_PER_FILE,
) -> IngestSummary:
    """Ingest NAME=LOCATION sources into the `instructions` stage of `data_dir`; see the module docstring.

    Raises SourceError or IngestError, before anything is written, when the input cannot be ingested.
    """
    resolved = ordered([parse_source(spec, text_column) for spec in sources])
    quotas = dict(quotas or {})
    _check_options(resolved, limit, quotas, text_column, max_chars, rows_per_file)
    for source in resolved:
        source.check()
    store = data_dir if isinstance(data_dir, Store) else Store(data_dir)
    summary = IngestSummary({s.name: Tally() for s in resolved})
    with store.catalog() as catalog:
        writer = InstructionWriter(store, catalog, summary, rows_per_file)
        failures = FailureLog(store, summary, rows_per_file)
        _run(resolved, writer, failures, summary, limit, seed, quotas, max_chars)
        writer.flush()
        failures.flush()
    return summary


def _check_options(sources: list[Source], limit: int | None, quotas: dict[str, int], text_column: str | None,
                   max_chars: int, rows_per_file: int) -> None:
    names = {s.name for s in sources}
    if not sources:
        raise IngestError("no source given: pass --source NAME=PATH_OR_HUB_ID")
    if limit is not None and limit < 0:
        raise IngestError(f"--limit must be >= 0, got {limit}")
    for name, quota in quotas.items():
        if name not in names:
            raise IngestError(f"--quota {name}={quota}: no source named {name} (sources: {', '.join(sorted(names))})")
        if quota < 0:
            raise IngestError(f"--quota {name}={quota}: a quota must be >= 0")
    if text_column and all(s.text_column is None for s in sources):
        raise IngestError("--text-column applies to your own sources only; the paper's sources have fixed layouts")
    if max_chars < 1 or rows_per_file < 1:
        raise IngestError("--max-chars and rows per file must be >= 1")


def _run(sources: list[Source], writer: InstructionWriter, failures: FailureLog, summary: IngestSummary,
         limit: int | None, seed: int, quotas: dict[str, int], max_chars: int) -> None:
    by_quota = {name: LowestRanks(n, seed) for name, n in quotas.items()}
    by_limit = LowestRanks(limit, seed) if limit is not None else None
    seen: set[int] = set()

    def select(pick: Pick, lowest: LowestRanks | None, reason: str) -> None:
        if lowest is None:
            writer.add(pick)
        elif (out := lowest.offer(pick)) is not None:
            summary.tallies[out.source].dropped[reason] += 1

    for source in sources:
        dropped = summary.tallies[source.name].dropped
        quota = by_quota.get(source.name)
        for row in source.rows():
            candidate = row.outcome
            if type(candidate) is RowError:
                dropped[candidate.reason] += 1
                failures.add(source.name, row.origin, row.number, candidate, row.raw)
                continue
            reason = drop_reason(candidate.text, candidate.user_turns, candidate.language, max_chars)
            if reason:
                dropped[reason] += 1
                continue
            text = candidate.text.strip()
            iid = instruction_id(text)
            key = _dedup_key(iid)
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            pick = Pick(source.name, iid, text, source.main_source, candidate.original_source)
            if quota is not None:
                select(pick, quota, "over_quota")
            else:
                select(pick, by_limit, "over_limit")
    for lowest in by_quota.values():
        for pick in lowest.picks():
            select(pick, by_limit, "over_limit")
    for pick in by_limit.picks() if by_limit else ():
        writer.add(pick)

