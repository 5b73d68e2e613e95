"""Which instructions a build takes: the pool in seeded order, drawn until N are accepted (decision 8).

A rebuild draws the instructions that are already complete under the current plan first: when N of them
are there, nothing is asked again (a no-op rebuild makes no call), and instructions that failed before
are retried only when the build needs more rows than it has."""
from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.dataset as ds

from facets.schemas import NUM_BUCKETS, Instruction, bucket_of, from_table
from facets.storage import Store
from facets.tasks.plan import StagePlan, seeded_rank
from facets.schemas.stages import STAGE_NAMES
from facets.pipeline.shard import bucket_range

STAGE = "instructions"


class Pool:
    """Instruction ids in draw order; texts are read only for the ids drawn, so memory holds ids, not texts."""

    def __init__(self, store: Store, seed: int):
        self.store = store
        ids = store.read(STAGE, columns=["id"]).column("id").to_pylist()
        self.order = sorted(set(ids), key=lambda iid: (seeded_rank(iid, seed), iid))
        self.cursor = 0

    def __len__(self) -> int:
        return len(self.order)

    @property
    def remaining(self) -> int:
        return len(self.order) - self.cursor

    def prefer(self, complete: set[str]) -> int:
        """Puts these ids first, each group keeping its seeded order; returns how many were in the pool."""
        first = [iid for iid in self.order if iid in complete]
        self.order = first + [iid for iid in self.order if iid not in complete]
        return len(first)

    def draw(self, count: int) -> list[Instruction]:
        chosen = self.order[self.cursor : self.cursor + count]
        self.cursor += len(chosen)
        return self.load(chosen)

    def load(self, ids: list[str]) -> list[Instruction]:
        return load_instructions(self.store, ids)


def load_instructions(store: Store, ids: list[str], buckets: tuple[int, int] | None = None) -> list[Instruction]:
    """The stored instructions of these ids, one each; `buckets` (lo, hi), where they all fall, lets the
    read skip the row groups outside that range (ingest writes in bucket order)."""
    files = store.files(STAGE)
    if not ids or not files:
        return []
    wanted = ds.field("id").isin(ids)
    if buckets is not None:
        wanted = (ds.field("bucket") >= buckets[0]) & (ds.field("bucket") <= buckets[1]) & wanted
    table = ds.dataset(files, format="parquet", filesystem=store.fs).to_table(filter=wanted)
    if not table.num_rows:
        return []
    # one row per id: ingest never writes an id twice, but two concurrent ingests might
    ids_column = table.column("id").combine_chunks()
    first = pc.index_in(ids_column, value_set=ids_column)
    table = table.take(sorted(set(first.to_pylist())))
    return list(from_table(table, Instruction))


def complete_instructions(store: Store, plan: StagePlan) -> set[str]:
    """Ids whose pair row is stored with the fingerprint the current plan gives it (so every row before it is too)."""
    table = store.read("pairs", columns=["instruction_id", "fingerprint"])
    return {iid for iid, fp in zip(table.column("instruction_id").to_pylist(), table.column("fingerprint").to_pylist())
            if plan.fingerprints(iid).pairs == fp}


def near_damage(store: Store, ids: set[str]) -> set[str]:
    """Those of `ids` in the bucket range of a stage file moved aside as damaged (`Store.move_aside`): a row
    before their pair may have gone with it, so they are not taken as complete without looking."""
    spans = [bucket_range(name) or (0, NUM_BUCKETS - 1) for stage in STAGE_NAMES for name in store.damaged(stage)]
    return {iid for iid in ids if any(lo <= bucket_of(iid) <= hi for lo, hi in spans)} if spans else set()
