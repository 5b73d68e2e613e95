"""What every stage of one build shares: config, store, templates, plan, and one gateway per LLM stage.

`ask` is the one way a stage spends money: online, each request goes through the gateway (journal,
limiter, retries, repair) with hundreds in flight on one event loop; in batch mode the shard's requests
go out as one OpenAI batch whose results land in the same journal.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from facets.llm.batch import BatchItem, BatchRunner
from facets.llm.gateway import Call, Gateway
from facets.llm.transport import Transport
from facets.schemas.config import BuildConfig
from facets.storage import Store
from facets.tasks.plan import StagePlan
from facets.schemas.stages import STAGE_NAMES
from facets.pipeline.shard import Shard, StageCount, existing_rows, write_failures, write_rows
from facets.tasks.templates import Template

Key = tuple[str, int]  # (instruction id, set index)
log = logging.getLogger(__name__)


@dataclass(slots=True)
class Request:
    key: Key
    call: Call
    to_row: Callable[[Any], BaseModel]


class BuildContext:
    def __init__(self, config: BuildConfig, store: Store, templates: dict[str, Template],
                 gateways: dict[str, Gateway], batches: dict[str, BatchRunner] | None = None,
                 stored: dict[str, list[str]] | None = None, transport: Transport | None = None):
        self.config, self.store, self.templates = config, store, templates
        self.gateways, self.batches = gateways, batches or {}
        self.transport = transport  # the gateways' shared connections, closed after them
        self.plan = StagePlan.of(config, templates)
        # the stage files there before this build (listed now unless given): other shards of the build
        # hold other instructions, and listing again would make each shard open the files of every shard
        # before it (the small replacement shards span every bucket range), quadratic in the build's size
        # (a cut file is moved aside here, before any shard or `complete_instructions` reads: `Store.whole`)
        self.stored = stored if stored is not None else {stage: store.whole(store.files(stage)) for stage in STAGE_NAMES}

    def stored_files(self, stage: str, shard: Shard) -> list[str]:
        """Where a shard's stored rows of `stage` can be: the files there before this build, and those the
        shard wrote itself (a stage that Prefect retries)."""
        return self.stored.get(stage, []) + shard.written.get(stage, [])

    def prepare(self, stage: str, messages: list[dict], **options: Any) -> Call:
        settings = self.config.stages[stage]
        return self.gateways[stage].prepare(messages, settings.sampling, model=self.config.model_of(stage), **options)

    async def fill(self, stage: str, shard: Shard,
                   make: Callable[[list[Key]], Awaitable[dict[Key, BaseModel]]]) -> None:
        """Reuse the stored rows of each instruction the stage before has finished and make the missing ones
        as the instructions come, then write the new rows; an instruction goes on to the next stage as soon
        as it has all its rows here. In batch mode the missing rows are made at once: one batch per shard."""
        found = existing_rows(self.store, stage, shard, shard.wanted(stage), self.stored_files(stage, shard))
        rows = shard.rows.setdefault(stage, {})  # kept across a retry: a stage after this one may be reading it
        done, batch, running = shard.feeds[stage], [], set()
        consumed: list[str] = []

        async def make_some(keys: list[Key]) -> None:
            rows.update(await make(keys))
            for iid in dict.fromkeys(iid for iid, _ in keys):
                if all(key in rows for key in shard.keys(stage, iid)):
                    done.put(iid)

        try:
            async for iid in shard.source(stage).read():
                consumed.append(iid)
                keys = shard.keys(stage, iid)
                rows.update((key, found[key]) for key in keys if key in found)
                todo = [key for key in keys if key not in rows]
                if not todo:
                    done.put(iid)
                elif stage in self.batches:
                    batch.append(todo)
                elif stage in self.gateways:  # an LLM call: made alongside the instructions still to come
                    running.add(asyncio.create_task(make_some(todo)))
                else:
                    await make_some(todo)
            if batch:
                await make_some([key for keys in batch for key in keys])
            await all_or_none(running)
        except BaseException:  # a stage that stops (cancelled, a call aborted the run) keeps what it made
            await _cancel(running)
            with _logged(f"{stage} of {shard.name}: could not write what the stage made before it stopped"):
                self.keep(stage, shard, consumed, found, rows)
            raise
        keys, made = self.keep(stage, shard, consumed, found, rows)
        reused = sum(key in found for key in keys)
        shard.counts[stage] = StageCount(reused, len(made), len(keys) - reused - len(made))
        done.close()

    def keep(self, stage: str, shard: Shard, consumed: list[str], found: dict,
             rows: dict) -> tuple[list[Key], list[BaseModel]]:
        """Write the rows a stage made and the failures its calls left (they were kept as they happened)."""
        keys = [key for iid in consumed for key in shard.keys(stage, iid)]
        made = [rows[key] for key in keys if key in rows and key not in found]
        write_rows(self.store, stage, shard, made)
        gateway = self.gateways.get(stage)
        if gateway is not None:
            write_failures(self.store, shard, gateway.drain_failures())
            if gateway.failure_log is not None:
                gateway.failure_log.written()
        return keys, made

    async def ask(self, stage: str, shard: Shard, requests: list[Request]) -> dict[Key, BaseModel]:
        """Rows for the requests that came back good; the others go to the gateway's failures with their raw output."""
        gateway = self.gateways[stage]
        if stage in self.batches:
            items = [BatchItem(r.call, stage, _failure_key(r.key)) for r in requests]
            by_key = await self.batches[stage].run(items)
            results = [by_key.get(_failure_key(r.key)) for r in requests]
        else:
            results = await asyncio.gather(*(gateway.run(r.call, stage, _failure_key(r.key)) for r in requests))
        return {r.key: r.to_row(done.value) for r, done in zip(requests, results) if done is not None}

    async def aclose(self) -> None:
        for runner in self.batches.values():
            await runner.aclose()
        for gateway in self.gateways.values():
            await gateway.aclose()
        if self.transport is not None:
            await self.transport.close()
        for gateway in self.gateways.values():
            if gateway.failure_log is not None:
                gateway.failure_log.close()
        for limiters in {id(g.limiters): g.limiters for g in self.gateways.values()}.values():
            limiters.close()
        journals = {id(g.journal): g.journal for g in self.gateways.values() if g.journal is not None}
        for journal in journals.values():
            journal.close()


async def _cancel(tasks: set[asyncio.Task]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def _logged(what: str) -> Iterator[None]:
    """On the way out of a failed stage: a second error is logged, never raised over the first. The
    failures stay in their live file then, and the next build writes them."""
    try:
        yield
    except Exception as exc:
        log.warning("%s: %s", what, exc)


async def all_or_none(tasks: Iterable[asyncio.Task]) -> None:
    """Wait for every task; the first to fail (or a cancellation of the waiter) cancels the others, and
    the error is raised as it is, not wrapped in an ExceptionGroup as a TaskGroup would."""
    pending = set(tasks)
    try:
        while pending:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
            for task in finished:
                task.result()
    finally:
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


def _failure_key(key: Key) -> str:
    return f"{key[0]}#{key[1]}"
