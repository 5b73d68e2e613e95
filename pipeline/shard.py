"""A shard: the instructions of one bucket range and what each stage made for them so far.

Stage files are labelled with the shard's bucket range (`b0000-0063-...parquet`), so a stage finds the
rows it already has by reading only the files whose range overlaps its own: a resumed or incremental build
reads a shard's own files, not the whole stage.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import pyarrow.dataset as ds
from pydantic import BaseModel

from facets.schemas import Failure, Instruction, arrow_schema, from_table
from facets.schemas.shards import ShardSummary
from facets.storage import Store
from facets.storage.stages import model_of
from facets.pipeline.feed import Feed
from facets.schemas.stages import STAGES
from facets.tasks.plan import Fingerprints

PER_INSTRUCTION = tuple(stage.name for stage in STAGES if stage.rows != "per_set")  # one row each, keyed (id, 0)
_RANGE = re.compile(r"^b(\d+)-(\d+)-")


@dataclass
class StageCount:
    reused: int = 0
    made: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"reused": self.reused, "made": self.made, "failed": self.failed}


class Shard:
    """Plain class on purpose: Prefect does not walk it when it is passed to a task."""

    def __init__(self, lo: int, hi: int, instructions: list[Instruction], plans: dict[str, Fingerprints], sets: int,
                 draw: int = 0):
        self.lo, self.hi, self.sets = lo, hi, sets
        self.name = f"b{lo:04d}-{hi:04d}"  # the label of its files: a bucket range
        # what the UI shows: replacements drawn later for the same bucket range say which draw they are
        self.title = self.name if draw == 0 else f"{self.name}-draw{draw}"
        self.instructions = {i.id: i for i in instructions}
        self.plans = plans
        self.rows: dict[str, dict[tuple[str, int], BaseModel]] = {}
        self.counts: dict[str, StageCount] = {}
        self.failures: Counter[str] = Counter()
        self._accepted: list[str] | None = None
        self._alive = len(instructions)  # instructions that came through the last stage done
        self.feeds: dict[str | None, Feed] = {}
        self.written: dict[str, list[str]] = {}  # stage -> the files this shard wrote there

    def open_feeds(self, stages: tuple[str, ...]) -> None:
        """Fresh feeds for one run through `stages`: the first stage reads every instruction of the shard."""
        self._previous = dict(zip(stages, (None, *stages[:-1])))
        self.feeds = {None: Feed(self.instructions, closed=True), **{stage: Feed() for stage in stages}}

    def source(self, stage: str) -> Feed:
        """What `stage` works on: the instructions the stage before it has finished."""
        return self.feeds[self._previous[stage]]

    def keys(self, stage: str, iid: str) -> list[tuple[str, int]]:
        """The rows `stage` makes for one instruction: one, or one per preference set."""
        return [(iid, 0)] if stage in PER_INSTRUCTION else [(iid, k) for k in range(self.sets)]

    def wanted(self, stage: str) -> dict[tuple[str, int], str]:
        """Every row `stage` may make for this shard, with the fingerprint it must have."""
        return {key: getattr(self.plans[iid], stage) for iid in self.instructions for key in self.keys(stage, iid)}

    def alive(self, stage: str | None) -> list[str]:
        """Instructions that have every row of `stage` (all of them when `stage` is None)."""
        if stage is None:
            return list(self.instructions)
        have = Counter(iid for iid, _ in self.rows.get(stage, {}))
        want = 1 if stage in PER_INSTRUCTION else self.sets
        return [iid for iid in self.instructions if have[iid] == want]

    def accepted(self) -> list[str]:
        """Instructions with a tree, all sets, system messages and responses, and a pair (decision 8)."""
        return self._accepted if self._accepted is not None else self.alive("pairs")

    def stage_done(self, stage: str) -> None:
        self._alive = len(self.alive(stage))

    def expected(self) -> int:
        """Instructions that may still be accepted: all of them before the first stage, the accepted at the end."""
        return len(self._accepted) if self._accepted is not None else self._alive

    def reported(self, alive: int) -> None:
        """A run of this shard on another worker came through a stage with `alive` instructions."""
        if self._accepted is None:
            self._alive = alive

    def keep_only(self, kept: set[str]) -> None:
        """Accept only those of the accepted instructions in `kept` (a build that got more than it wanted)."""
        self._accepted = [iid for iid in self.accepted() if iid in kept]

    def reuse_complete(self, stages: tuple[str, ...]) -> None:
        """Every instruction is already complete under the current plan (its pair row is stored with the
        fingerprint the plan gives it): count the rows as reused without reading them."""
        n = len(self.instructions)
        self.counts = {stage: StageCount(reused=n if stage in PER_INSTRUCTION else n * self.sets) for stage in stages}
        self._accepted = list(self.instructions)
        self.instructions = {iid: None for iid in self.instructions}

    def summary(self, **fields) -> ShardSummary:
        return ShardSummary(name=self.name, accepted=self.accepted(), drawn=len(self.instructions),
                            failures=dict(self.failures),
                            counts={stage: count.as_dict() for stage, count in self.counts.items()}, **fields)

    def apply(self, summary: ShardSummary) -> None:
        """Take the outcome of a run of this shard on another worker."""
        self.counts = {stage: StageCount(**count) for stage, count in summary.counts.items()}
        self.failures = Counter(summary.failures)
        self._accepted = list(summary.accepted)
        self.instructions = {iid: None for iid in self.instructions}

    def finish(self) -> None:
        """Keep what the release needs (accepted ids, fingerprints, counts) and let the texts go, so a
        build's memory is bounded by the shards in flight, not by the collection."""
        self._accepted = self.alive("pairs")
        self.rows.clear()
        self.feeds.clear()
        self.instructions = {iid: None for iid in self.instructions}


def existing_rows(store: Store, stage: str, shard: Shard, wanted: dict[tuple[str, int], str],
                  stored: list[str]) -> dict[tuple[str, int], BaseModel]:
    """Rows already stored for `wanted` keys ((instruction id, set index) -> fingerprint), one per key,
    looked for in those of the stage's files `stored` whose bucket range overlaps the shard's. A file that
    cannot be read is moved aside (`Store.read_files`): its rows are made again."""
    files = [f for f in stored if _overlaps(f, shard.lo, shard.hi)]
    if not files or not wanted:
        return {}
    ids = sorted({iid for iid, _ in wanted})
    fps = sorted(set(wanted.values()))

    def read(some: list[str]):
        if not some:
            return arrow_schema(model_of(stage)).empty_table()
        dataset = ds.dataset(some, format="parquet", filesystem=store.fs)
        return dataset.to_table(filter=ds.field("instruction_id").isin(ids) & ds.field("fingerprint").isin(fps))

    table = store.read_files(files, read)
    found: dict[tuple[str, int], BaseModel] = {}
    for row in from_table(table, model_of(stage)):
        key = (row.instruction_id, getattr(row, "set_index", 0))
        if wanted.get(key) == row.fingerprint:
            found.setdefault(key, row)
    return found


def overlapping(stored: dict[str, list[str]], lo: int, hi: int) -> dict[str, list[str]]:
    """stage -> the names of those of its files `stored` whose bucket range overlaps [lo, hi]."""
    return {stage: [f.rsplit("/", 1)[-1] for f in files if _overlaps(f, lo, hi)] for stage, files in stored.items()}


def bucket_range(name: str) -> tuple[int, int] | None:
    """The bucket range a file name starts with (a shard's name, `b0000-0255-...`), if it has one."""
    match = _RANGE.match(name)
    return None if match is None else (int(match[1]), int(match[2]))


def _overlaps(path: str, lo: int, hi: int) -> bool:
    span = bucket_range(path.rsplit("/", 1)[-1])
    return span is None or (span[0] <= hi and span[1] >= lo)


def write_rows(store: Store, stage: str, shard: Shard, rows: list[BaseModel]) -> None:
    if rows:
        shard.written.setdefault(stage, []).append(store.write(stage, rows, label=shard.name))


def write_failures(store: Store, shard: Shard, failures: list[Failure]) -> None:
    for failure in failures:
        shard.failures[f"{failure.stage}:{failure.reason}"] += 1
    if failures:
        store.write_failures(failures, label=shard.name)
