"""Which instructions a build takes: the pool in seeded order, drawn until N are accepted (decision 8).

A rebuild draws the instructions that are already complete under the current plan first: when N of them
are there, nothing is asked again (a no-op rebuild makes no call), and instructions that failed before
are retried only when the build needs more rows than it has."""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import pyarrow.compute as pc
import pyarrow.dataset as ds

from facets.schemas import NUM_BUCKETS, Instruction, bucket_of, from_table
from facets.storage import Store
from facets.tasks.plan import StagePlan, seeded_rank
from facets.schemas.stages import STAGE_NAMES
from facets.pipeline.shard import bucket_range

STAGE = "instructions"


class Pool:
    """Instruction ids in draw order; texts are read only for the ids drawn, so memory holds ids, not texts.

    With `quotas` (a build's source mix, `BuildConfig.quotas`), the order comes in three tiers, each in seeded
    order: the first N ids of every group with a quota of N; then the ids of the groups whose count is unknown
    (or not named), which fill what the limit leaves; then the rest of the quota groups, drawn only to replace
    instructions that failed. A group is a source (`nectar`) or one original source of it
    (`nectar/anthropic-hh`); an id belongs to the most specific group named."""

    def __init__(self, store: Store, seed: int, quotas: Mapping[str, int | None] | None = None):
        self.store = store
        columns = ["id", "main_source", "original_source"] if quotas else ["id"]
        table = store.read(STAGE, columns=columns)
        ids = table.column("id").to_pylist()
        order = sorted(set(ids), key=lambda iid: (seeded_rank(iid, seed), iid))
        self.tiers = _quota_tiers(order, table, quotas) if quotas else [order]
        self.order = [iid for tier in self.tiers for iid in tier]
        self.cursor = 0

    def __len__(self) -> int:
        return len(self.order)

    @property
    def remaining(self) -> int:
        return len(self.order) - self.cursor

    def prefer(self, complete: set[str]) -> int:
        """Puts these ids first within their tier, each group keeping its seeded order (so a source mix holds
        on a rebuild); returns how many were in the pool."""
        self.tiers = [[iid for iid in tier if iid in complete] + [iid for iid in tier if iid not in complete]
                      for tier in self.tiers]
        self.order = [iid for tier in self.tiers for iid in tier]
        return sum(iid in complete for iid in self.order)

    def draw(self, count: int) -> list[Instruction]:
        chosen = self.order[self.cursor : self.cursor + count]
        self.cursor += len(chosen)
        return self.load(chosen)

    def load(self, ids: list[str]) -> list[Instruction]:
        return load_instructions(self.store, ids)


def _quota_tiers(order: list[str], table, quotas: Mapping[str, int | None]) -> list[list[str]]:
    from facets.ingest.sources import MAIN_SOURCES

    names = {main: name for name, main in MAIN_SOURCES.items()}
    sources = dict(zip(table.column("id").to_pylist(),
                       zip(table.column("main_source").to_pylist(), table.column("original_source").to_pylist())))
    taken: Counter[str] = Counter()
    first, fill, reserve = [], [], []
    for iid in order:
        main, original = sources[iid]
        name = names.get(main, main)
        group = next((g for g in (f"{name}/{original or '-'}", name) if g in quotas), None)
        quota = quotas.get(group) if group is not None else None
        if quota is None:
            fill.append(iid)
        elif taken[group] < quota:
            taken[group] += 1
            first.append(iid)
        else:
            reserve.append(iid)
    return [first, fill, reserve]


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
