"""OpenAI Batch API mode: the same calls as online, half the price, results into the same journal.

A batch is named by the hash of the journal keys it carries. Its id is saved under
`journal/batches/<name>.json` in the data dir as soon as it exists, so a restarted run polls the batch
it already paid for instead of submitting it again. Output lines are judged exactly like online replies
(a reply cut by `max_tokens` or failing validation is a failure) and accepted ones are journaled with
`source="batch"`, so a later online run of the same calls sends nothing.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import orjson

from facets.llm.gateway import Call, Completion, Gateway, Rejected
from facets.llm.transport import parse_reply

log = logging.getLogger(__name__)
MAX_REQUESTS_PER_BATCH = 50_000
MAX_BYTES_PER_BATCH = 150 * 1024 * 1024
TERMINAL = {"completed", "failed", "expired", "cancelled"}


@dataclass(slots=True)
class BatchItem:
    call: Call
    stage: str
    key: str


@dataclass(slots=True)
class _ToRepair:
    item: BatchItem
    rejected: Rejected
    content: str


class BatchRunner:
    def __init__(self, gateway: Gateway, data_dir: str, poll_initial_s: float = 5.0, poll_max_s: float = 300.0):
        self.gateway = gateway
        endpoint = gateway.endpoint
        api_key = endpoint.api_key.get_secret_value() if endpoint.api_key else "unused"
        import openai  # here, not at the top: online builds (and every shard run) skip its 1-2 s import

        self.client = openai.AsyncOpenAI(base_url=gateway.url, api_key=api_key, max_retries=5)
        self.fs, root = fsspec.core.url_to_fs(str(data_dir))
        self.state_dir = f"{root.rstrip('/')}/journal/batches"
        self.poll_initial_s = poll_initial_s
        self.poll_max_s = poll_max_s

    async def run(self, items: Sequence[BatchItem]) -> dict[str, Completion | None]:
        """Results by caller key: journal hits first, then one batch per chunk of what is missing."""
        results: dict[str, Completion | None] = {}
        pending: list[BatchItem] = []
        for item in items:
            cached = self.gateway.from_journal(item.call)
            if cached is not None:
                results[item.key] = cached
            else:
                pending.append(item)
        for chunk in _chunks(pending):
            results.update(await self._run_chunk(chunk))
        # replies the batch returned but that failed their checks get the online repair loop
        repairs = {k: r for k, r in results.items() if isinstance(r, _ToRepair)}
        repaired = await asyncio.gather(*(self.gateway.repair(r.item.call, r.item.stage, k, r.rejected, r.content)
                                          for k, r in repairs.items()))
        results.update(zip(repairs, repaired))
        return results

    async def _run_chunk(self, chunk: list[BatchItem]) -> dict[str, Completion | None]:
        lines = [orjson.dumps({"custom_id": i.call.key, "method": "POST", "url": "/v1/chat/completions", "body": i.call.body}) for i in chunk]
        name = hashlib.sha256(b"\n".join(sorted(lines))).hexdigest()[:24]
        batch = await self._find_or_submit(name, b"\n".join(lines) + b"\n")
        batch = await self._wait(batch)
        by_key = {i.call.key: i for i in chunk}
        results: dict[str, Completion | None] = {}
        if batch.output_file_id:
            for record in await self._lines(batch.output_file_id):
                item = by_key.pop(record.get("custom_id"), None)
                if item is not None:
                    results[item.key] = self._accept(item, record)
        if batch.error_file_id:
            for record in await self._lines(batch.error_file_id):
                item = by_key.pop(record.get("custom_id"), None)
                if item is not None:
                    results[item.key] = self._record_error(item, record)
        for item in by_key.values():
            results[item.key] = self.gateway.fail(item.stage, item.key, f"batch_{batch.status}", "", f"batch {batch.id} gave no result")
        return results

    async def _find_or_submit(self, name: str, payload: bytes):
        state_path = f"{self.state_dir}/{name}.json"
        if self.fs.exists(state_path):
            batch_id = orjson.loads(self.fs.cat_file(state_path))["batch_id"]
            batch = await self.client.batches.retrieve(batch_id)
            if batch.status not in {"failed", "expired", "cancelled"}:
                log.info("resuming batch %s (%s)", batch.id, batch.status)
                return batch
        upload = await self.client.files.create(file=(f"{name}.jsonl", payload), purpose="batch")
        batch = await self.client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"facets_batch": name}
        )
        self.fs.makedirs(self.state_dir, exist_ok=True)
        self.fs.pipe_file(state_path, orjson.dumps({"batch_id": batch.id, "input_file_id": upload.id}))
        log.info("submitted batch %s with %d requests", batch.id, payload.count(b"\n"))
        return batch

    async def _wait(self, batch):
        delay = self.poll_initial_s
        while batch.status not in TERMINAL:
            await asyncio.sleep(delay)
            delay = min(self.poll_max_s, delay * 1.5)
            batch = await self.client.batches.retrieve(batch.id)
            counts = batch.request_counts
            log.info("batch %s %s: %s/%s done", batch.id, batch.status, counts and counts.completed, counts and counts.total)
        return batch

    async def _lines(self, file_id: str) -> list[dict]:
        content = (await self.client.files.content(file_id)).content
        return [orjson.loads(line) for line in content.splitlines() if line.strip()]

    def _accept(self, item: BatchItem, record: dict) -> "Completion | _ToRepair | None":
        response = record.get("response") or {}
        if response.get("status_code") != 200 or record.get("error"):
            return self._record_error(item, record)
        reply = parse_reply(response.get("body") or {}, {})
        gateway = self.gateway
        gateway.usage.add_reply(reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens, self._cost(item, reply), 0.0)
        try:
            value = gateway.judge(item.call, reply)
        except Rejected as exc:
            return _ToRepair(item, exc, reply.contents[0])
        gateway.record(item.call, reply, value, 0.0, "batch")
        return Completion(item.call.key, reply.contents[0], value, reply.prompt_tokens, reply.completion_tokens, 0.0, False)

    def _cost(self, item: BatchItem, reply) -> float | None:
        from facets.llm.pricing import BATCH_DISCOUNT

        price = self.gateway.prices.get(item.call.model)
        return price.cost(reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) * BATCH_DISCOUNT if price else None

    def _record_error(self, item: BatchItem, record: dict) -> None:
        error = record.get("error") or ((record.get("response") or {}).get("body") or {}).get("error") or {}
        status = (record.get("response") or {}).get("status_code")
        reason = f"batch_http_{status}" if status else "batch_error"
        return self.gateway.fail(item.stage, item.key, reason, orjson.dumps(record).decode()[:4000], str(error.get("message", error)))

    async def aclose(self) -> None:
        await self.client.close()


def _chunks(items: list[BatchItem]) -> list[list[BatchItem]]:
    chunks: list[list[BatchItem]] = [[]]
    size = 0
    for item in items:
        item_size = len(orjson.dumps(item.call.body)) + 100
        if chunks[-1] and (len(chunks[-1]) >= MAX_REQUESTS_PER_BATCH or size + item_size > MAX_BYTES_PER_BATCH):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += item_size
    return [c for c in chunks if c]
