"""Which instructions a build takes: the pool in seeded order, drawn until N are accepted (decision 8)."""
from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.dataset as ds

from facets.schemas import Instruction, from_table
from facets.storage import Store
from facets.tasks.plan import seeded_rank

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

    def draw(self, count: int) -> list[Instruction]:
        chosen = self.order[self.cursor : self.cursor + count]
        self.cursor += len(chosen)
        return self.load(chosen)

    def load(self, ids: list[str]) -> list[Instruction]:
        files = self.store.files(STAGE)
        if not ids or not files:
            return []
        table = ds.dataset(files, format="parquet", filesystem=self.store.fs).to_table(filter=ds.field("id").isin(ids))
        # one row per id: ingest never writes an id twice, but two concurrent ingests might
        ids_column = table.column("id").combine_chunks()
        first = pc.index_in(ids_column, value_set=ids_column)
        table = table.take(sorted(set(first.to_pylist())))
        return list(from_table(table, Instruction))

