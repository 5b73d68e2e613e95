"""What every stage of one build shares: config, store, templates, plan, and one gateway per LLM stage.

`ask` is the one way a stage spends money: online, each request goes through the gateway (journal,
limiter, retries, repair) with hundreds in flight on one event loop; in batch mode the shard's requests
go out as one OpenAI batch whose results land in the same journal.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from facets.llm.batch import BatchItem, BatchRunner
from facets.llm.gateway import Call, Gateway
from facets.schemas.config import BuildConfig
from facets.storage import Store
from facets.tasks.plan import StagePlan
from facets.tasks.shard import Shard, StageCount, existing_rows, write_failures, write_rows
from facets.tasks.templates import Template

Key = tuple[str, int]  # (instruction id, set index)


@dataclass(slots=True)
class Request:
    key: Key
    call: Call
    to_row: Callable[[Any], BaseModel]


class BuildContext:
    def __init__(self, config: BuildConfig, store: Store, templates: dict[str, Template],
                 gateways: dict[str, Gateway], batches: dict[str, BatchRunner] | None = None):
        self.config, self.store, self.templates = config, store, templates
        self.gateways, self.batches = gateways, batches or {}
        self.plan = StagePlan.of(config, templates)

    def prepare(self, stage: str, messages: list[dict], **options: Any) -> Call:
        settings = self.config.stages[stage]
        return self.gateways[stage].prepare(messages, settings.sampling, model=self.config.model_of(stage), **options)

    async def fill(self, stage: str, shard: Shard, wanted: dict[Key, str],
                   make: Callable[[list[Key]], Awaitable[dict[Key, BaseModel]]]) -> None:
        """Reuse the stored rows of `wanted` (key -> fingerprint), make the missing ones, write them."""
        found = existing_rows(self.store, stage, shard, wanted)
        todo = [key for key in wanted if key not in found]
        made = await make(todo) if todo else {}
        write_rows(self.store, stage, shard, list(made.values()))
        shard.rows[stage] = {**found, **made}
        shard.counts[stage] = StageCount(len(found), len(made), len(todo) - len(made))

    async def ask(self, stage: str, shard: Shard, requests: list[Request]) -> dict[Key, BaseModel]:
        """Rows for the requests that came back good; the others are in `failures` with their raw output."""
        gateway = self.gateways[stage]
        if stage in self.batches:
            items = [BatchItem(r.call, stage, _failure_key(r.key)) for r in requests]
            by_key = await self.batches[stage].run(items)
            results = [by_key.get(_failure_key(r.key)) for r in requests]
        else:
            results = await asyncio.gather(*(gateway.run(r.call, stage, _failure_key(r.key)) for r in requests))
        write_failures(self.store, shard, gateway.drain_failures())
        return {r.key: r.to_row(done.value) for r, done in zip(requests, results) if done is not None}

    async def aclose(self) -> None:
        for runner in self.batches.values():
            await runner.aclose()
        for gateway in self.gateways.values():
            await gateway.aclose()
        journals = {id(g.journal): g.journal for g in self.gateways.values() if g.journal is not None}
        for journal in journals.values():
            journal.close()


def _failure_key(key: Key) -> str:
    return f"{key[0]}#{key[1]}"
