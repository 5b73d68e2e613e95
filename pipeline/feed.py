"""A feed: the instructions of a shard that one stage has finished, in the order it finished them.

The next stage reads it while the stage is still running, so an instruction goes on to its system
messages as soon as its tree is made, not when the shard's last tree is: every stage of a shard is in
flight at once, and the endpoint sees token-heavy trees and request-heavy later calls side by side
instead of in long runs of one kind. A feed can be read again from the start (a stage that Prefect
retries reads it again) and an instruction is put in it once at most.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable


class Feed:
    def __init__(self, ids: Iterable[str] = (), closed: bool = False):
        self.ids: list[str] = []
        self._seen: set[str] = set()
        self.closed = False
        self._changed = asyncio.Event()
        for iid in ids:
            self.put(iid)
        if closed:
            self.close()

    def put(self, iid: str) -> None:
        if iid not in self._seen:
            self._seen.add(iid)
            self.ids.append(iid)
            self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def started(self) -> None:
        """Returns once the feed has an instruction or is closed: the next stage has something to do."""
        while not self.ids and not self.closed:
            self._changed.clear()
            await self._changed.wait()

    async def read(self) -> AsyncIterator[str]:
        """Every instruction put so far, then each as it is put, until the feed is closed."""
        position = 0
        while True:
            while position < len(self.ids):
                yield self.ids[position]
                position += 1
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()
