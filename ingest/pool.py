"""The ingest stage: read the sources, apply the paper's rules, deduplicate, select, write `instructions`.

Order of decisions for every row, each counted by reason in the summary:
1. a row that cannot be mapped goes to `failures` (ingest/sources.py has the bad-input policy);
2. the rules of ingest/filters.py (multi-turn, not English, empty, too long, role-play preamble);
3. exact duplicates on the normalised text, i.e. on the instruction id: sources are read in a fixed
   priority (`sources.ordered`), so the first source in that order keeps a shared instruction whatever
   the order of the flags, and within a source the first row wins;
4. seeded selection: `--quota NAME=N` keeps a source's N candidates of lowest `seeded_rank`, then
   `--limit N` keeps the N lowest of what is left. Rank is a hash of (seed, id), so the choice does not
   depend on file order and a larger N keeps a superset of a smaller one. The limit counts instructions
   already in the data directory, so re-running with a larger limit adds only the difference;
5. ids already in the data directory are not written again (a DuckDB anti-join per output file).

Steps 1 and 2 and the instruction id are the costly part (parsing, hashing); they depend on one row
only, so large JSON-lines and Parquet files are cut into parts (`Origin.parts`) that worker processes
judge (`judge_part`) while this process takes their verdicts in file order and does steps 3 to 5. The
result is the same with any number of workers, one included.

Memory stays flat in the number of rows read: rows stream through, dedup keeps one integer per kept
instruction, at most two parts per worker are in flight, output leaves in files of `rows_per_file` rows
(in bucket order, row groups of `rows_per_group`, so a shard reads the groups of its range only), and only a selection (--limit / --quota) holds its N chosen candidates. Rows are built column-wise with
the functions `Instruction.from_text` uses; the model validates the first row of every file as a guard
against the two drifting apart.
"""
from __future__ import annotations

import hashlib
import heapq
import multiprocessing
import os
import sys
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import pyarrow as pa

from facets.schemas import Failure, Instruction, arrow_schema, bucket_of, from_table, instruction_id
from facets.storage import Catalog, Store
from facets.ingest.filters import DEFAULT_MAX_CHARS, drop_reason
from facets.ingest.sources import RAW_CHARS, Layout, Origin, RowError, Source, dump, map_record, ordered, parse_source

STAGE = "instructions"
ROWS_PER_FILE = 50_000
ROWS_PER_GROUP = 1_000  # 50 row groups a file: a shard of a few buckets reads a few of them
# A worker's unit of work. Large enough that a part's bookkeeping is noise, small enough to keep both
# memory (a part's verdicts) and the tail (the last part, read alone) small.
PART_BYTES = 16 << 20
# The one process that dedups and writes spends about a third of a worker's CPU per row (bench/ingest.py):
# past a few workers it is the bottleneck, and more would only wait on it.
MAX_WORKERS = 4
# Failed rows named one per line on stderr by the CLI; the rest are counted, and all are in `failures`.
FAILURES_SHOWN = 10
# Summary columns in the order a row meets them; failure reasons follow alphabetically.
REASON_ORDER = ("multi_turn", "not_english", "empty", "too_long", "role_play", "duplicate", "over_quota",
                "over_limit", "already_ingested")


class IngestError(Exception):
    """Options that cannot work together; the message is one line."""


class Pick(NamedTuple):
    source: str
    id: str
    bucket: int
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
    first_failures: list[str] = field(default_factory=list)  # "FILE: row N: why", the first FAILURES_SHOWN
    workers: int = 1  # processes that judged rows: 1 when everything was read in this process

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

    def __init__(self, store: Store, catalog: Catalog, summary: IngestSummary, rows_per_file: int,
                 rows_per_group: int = ROWS_PER_GROUP):
        self.store, self.catalog, self.summary, self.rows_per_file = store, catalog, summary, rows_per_file
        self.rows_per_group = rows_per_group
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
        fresh = [p for p in picks if p.id in new_ids] if len(new_ids) < len(picks) else picks
        for source, count in Counter(p.source for p in fresh).items():
            self.summary.tallies[source].kept += count
        for source, count in Counter(p.source for p in picks if p.id not in new_ids).items():
            self.summary.tallies[source].dropped["already_ingested"] += count
        if fresh:
            table = _instruction_table(fresh)
            from_table(table.slice(0, 1), Instruction)
            self.summary.files.append(self.store.write_table(self.store.table_dir(STAGE), table, label="ingest",
                                                             row_group_size=self.rows_per_group))


def _instruction_table(picks: list[Pick]) -> pa.Table:
    # in bucket order, so a shard run reads only the row groups of its bucket range (load_instructions)
    _, ids, buckets, texts, main_sources, original_sources = zip(*sorted(picks, key=lambda p: (p.bucket, p.id)))
    schema = arrow_schema(Instruction)
    return pa.table(
        {
            "id": ids,
            "bucket": buckets,
            "text": texts,
            "main_source": main_sources,
            "original_source": original_sources,
            "metadata": _empty_maps(len(picks), schema.field("metadata").type),
        },
        schema=schema,
    )


def _empty_maps(n: int, map_type: pa.DataType) -> pa.Array:
    """n empty maps, built from offsets: converting n Python `{}` costs more than the rest of the table."""
    no_strings = pa.array([], pa.string())
    return pa.MapArray.from_arrays(pa.array([0] * (n + 1), pa.int32()), no_strings, no_strings, type=map_type)


class FailureLog:
    """Rows that could not be mapped, written to `failures` in bounded batches."""

    def __init__(self, store: Store, summary: IngestSummary, rows_per_file: int):
        self.store, self.summary, self.rows_per_file = store, summary, rows_per_file
        self.buffer: list[Failure] = []

    def add(self, source: str, origin: str, number: int, failed: Failed) -> None:
        self.buffer.append(Failure(
            stage="ingest", key=origin, reason=failed.reason, detail=failed.detail, source=source, row=number,
            raw_output=(failed.raw or b"").decode("utf-8", errors="replace")[:RAW_CHARS],
        ))
        if len(self.summary.first_failures) < FAILURES_SHOWN:
            self.summary.first_failures.append(f"{origin}: row {number}: {failed.detail}")
        if len(self.buffer) >= self.rows_per_file:
            self.flush()

    def flush(self) -> None:
        failures, self.buffer = self.buffer, []
        if failures:
            self.store.write_failures(failures, label="ingest")
            self.summary.failures += len(failures)


# -- verdicts: what one row comes to, decided where the row is read -------------------------------------------
class Kept(NamedTuple):
    """A row that passed the rules; dedup and selection happen later, in one process, in source order."""

    id: str
    key: int
    bucket: int
    text: str
    original_source: str


class Failed(NamedTuple):
    """A row that could not be mapped; `number` counts from the start of its part."""

    number: int
    reason: str
    detail: str
    raw: bytes | None


# A drop reason (str), a Kept, a Failed, or None for a blank line.
Verdict = str | Kept | Failed | None


def verdicts(origin: Origin, layout: Layout, max_chars: int) -> Iterator[Verdict]:
    """One verdict per row of `origin`, in order: the per-row work (mapping, rules, normalised id).

    `map_rows` and the rules fused into one loop: this is the hot path of the stage, run for every row.
    """
    for number, record, raw in origin.records(layout.columns):
        if record is None:
            yield None
            continue
        if type(record) is RowError:
            yield Failed(number, record.reason, str(record), raw)
            continue
        candidate = map_record(layout, record)
        if type(candidate) is RowError:
            yield Failed(number, candidate.reason, str(candidate), raw or dump(record))
        elif reason := drop_reason(candidate.text, candidate.user_turns, candidate.language, max_chars):
            yield reason
        else:
            text = candidate.text.strip()
            iid = instruction_id(text)
            yield Kept(iid, _dedup_key(iid), bucket_of(iid), text, candidate.original_source)


def judge_part(layout: Layout, part: Origin, max_chars: int) -> tuple[int, list[Verdict]]:
    """A part's verdicts and its row count (the offset of the next part's row numbers); runs in a worker."""
    judged = list(verdicts(part, layout, max_chars))
    return len(judged), judged


# -- worker processes -------------------------------------------------------------------------------------------
def default_workers() -> int:
    """One worker per CPU this process may use, up to MAX_WORKERS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(cpus, MAX_WORKERS)


def _start_pool(workers: int) -> Executor | None:
    """Worker processes forked from this one, or None to judge in this process.

    Forked, never spawned: a spawned worker re-imports pyarrow, pydantic and our schemas, seconds that a
    fork does not pay. Forking is only safe in a process with one thread (the `facets ingest` command):
    another thread may hold a lock the child then waits on forever. So in a threaded process (a Prefect
    task run), and off Linux, the parts are judged here, one after the other: slower, same result. The
    pool starts before the catalog opens a DuckDB connection, whose threads would count too.
    """
    if workers < 2 or not sys.platform.startswith("linux") or threading.active_count() > 1:
        return None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork"))
    pool.submit(int).result()  # with fork, the first submit starts every worker: do it now
    return pool


class Judged(NamedTuple):
    """A part's verdicts; `base` is the number of rows of its origin before it."""

    source: Source
    origin: str
    base: int
    verdicts: Iterable[Verdict]


def _judged(source: Source, parts: dict[str, list[Origin]], max_chars: int, pool: Executor | None,
            in_flight: int) -> Iterator[Judged]:
    """The verdicts of every row of `source`, part by part, in file order."""
    for origin in source.origins:
        layout = source.layout(origin)
        pieces = parts[origin.label]
        if len(pieces) == 1:  # streamed: a single-part origin may be large (CSV, JSON array, hub)
            yield Judged(source, origin.label, 0, verdicts(origin, layout, max_chars))
            continue
        jobs = [(layout, piece, max_chars) for piece in pieces]
        results = _in_order(pool, jobs, in_flight) if pool is not None else (judge_part(*job) for job in jobs)
        base = 0
        for count, judged in results:
            yield Judged(source, origin.label, base, judged)
            base += count


def _in_order(pool: Executor, jobs: list[tuple], in_flight: int) -> Iterator[tuple[int, list[Verdict]]]:
    """judge_part over `jobs` in the pool, results in job order, at most `in_flight` submitted ahead."""
    pending: deque[Future] = deque()
    jobs_left = iter(jobs)
    try:
        for job in jobs_left:
            pending.append(pool.submit(judge_part, *job))
            if len(pending) >= in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


# -- the stage ----------------------------------------------------------------------------------------------------
def ingest(
    data_dir: str | Store,
    sources: Sequence[str | Source],
    *,
    limit: int | None = None,
    seed: int = 0,
    quotas: Mapping[str, int] | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
    text_column: str | None = None,
    rows_per_file: int = ROWS_PER_FILE,
    rows_per_group: int = ROWS_PER_GROUP,
    workers: int | None = None,
    part_bytes: int = PART_BYTES,
) -> IngestSummary:
    """Ingest sources into the `instructions` stage of `data_dir`; see the module docstring.

    A source is a NAME=LOCATION spec or an already resolved Source (for instance a HubDataset over a
    local dataset directory). `workers` processes judge large files (default: one per CPU; 1 reads
    everything in this process). Raises SourceError or IngestError, before anything is written, when
    the input cannot be ingested.
    """
    resolved = ordered([s if isinstance(s, Source) else parse_source(s, text_column) for s in sources])
    quotas = dict(quotas or {})
    workers = default_workers() if workers is None else workers
    _check_options(resolved, limit, quotas, text_column, max_chars, min(rows_per_file, rows_per_group), workers,
                   part_bytes)
    for source in resolved:
        source.check()
    parts = {o.label: o.parts(part_bytes) for s in resolved for o in s.origins}
    pool = _start_pool(workers) if any(len(p) > 1 for p in parts.values()) else None
    try:
        store = data_dir if isinstance(data_dir, Store) else Store(data_dir)
        summary = IngestSummary({s.name: Tally() for s in resolved}, workers=workers if pool is not None else 1)
        with Catalog(store) as catalog:
            writer = InstructionWriter(store, catalog, summary, rows_per_file, rows_per_group)
            failures = FailureLog(store, summary, rows_per_file)
            judged = (j for s in resolved for j in _judged(s, parts, max_chars, pool, 2 * workers))
            _run(judged, writer, failures, summary, limit, seed, quotas)
            writer.flush()
            failures.flush()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return summary


def _check_options(sources: list[Source], limit: int | None, quotas: dict[str, int], text_column: str | None,
                   max_chars: int, rows_per_file: int, workers: int, part_bytes: int) -> None:
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
        raise IngestError("--max-chars and rows per file (and per row group) must be >= 1")
    if workers < 1 or part_bytes < 1:
        raise IngestError(f"--workers must be >= 1, got {workers}" if workers < 1 else "part size must be >= 1")


def _run(judged: Iterator[Judged], writer: InstructionWriter, failures: FailureLog,
         summary: IngestSummary, limit: int | None, seed: int, quotas: dict[str, int]) -> None:
    """Steps 3 to 5 over the verdicts, in source order: this loop is the one serial part, so it stays lean."""
    by_quota = {name: LowestRanks(n, seed) for name, n in quotas.items()}
    by_limit = LowestRanks(limit, seed) if limit is not None else None
    seen: set[int] = set()

    def select(pick: Pick, lowest: LowestRanks | None, reason: str) -> None:
        if lowest is None:
            writer.add(pick)
        elif (out := lowest.offer(pick)) is not None:
            summary.tallies[out.source].dropped[reason] += 1

    for part in judged:
        name, main_source = part.source.name, part.source.main_source
        dropped = summary.tallies[name].dropped
        lowest, reason = (by_quota[name], "over_quota") if name in by_quota else (by_limit, "over_limit")
        for verdict in part.verdicts:
            kind = type(verdict)
            if kind is Kept:
                if verdict.key in seen:
                    dropped["duplicate"] += 1
                    continue
                seen.add(verdict.key)
                select(Pick(name, verdict.id, verdict.bucket, verdict.text, main_source, verdict.original_source),
                       lowest, reason)
            elif kind is str:
                dropped[verdict] += 1
            elif kind is Failed:
                dropped[verdict.reason] += 1
                failures.add(name, part.origin, part.base + verdict.number, verdict)
    for lowest in by_quota.values():
        for pick in lowest.picks():
            select(pick, by_limit, "over_limit")
    for pick in by_limit.picks() if by_limit else ():
        writer.add(pick)
