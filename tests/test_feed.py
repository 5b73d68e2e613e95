"""The feed that passes a shard's instructions from one stage to the next while both run."""
from __future__ import annotations

import asyncio

from facets.pipeline.feed import Feed


def test_a_reader_gets_each_instruction_once_as_it_comes_and_stops_when_the_feed_closes():
    async def main():
        feed = Feed()
        got: list[str] = []

        async def read() -> None:
            async for iid in feed.read():
                got.append(iid)

        reader = asyncio.create_task(read())
        started = asyncio.create_task(feed.started())
        await asyncio.sleep(0)
        assert not started.done(), "nothing put yet"
        feed.put("a")
        await asyncio.sleep(0)
        assert started.done() and got == ["a"], "the next stage starts on the first instruction"
        feed.put("b")
        feed.put("a")  # a retried stage finishes an instruction again: passed on once
        await asyncio.sleep(0)
        assert got == ["a", "b"] and not reader.done()
        feed.close()
        await asyncio.wait_for(reader, 1)
        again = [iid async for iid in feed.read()]  # a retried next stage reads it from the start
        assert again == ["a", "b"]

    asyncio.run(main())


def test_a_closed_empty_feed_has_started_and_reads_nothing():
    async def main():
        feed = Feed(closed=True)
        await asyncio.wait_for(feed.started(), 1)
        assert [iid async for iid in feed.read()] == []
        assert [iid async for iid in Feed(["x", "y"], closed=True).read()] == ["x", "y"]

    asyncio.run(main())
