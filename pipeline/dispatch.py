"""Shards on a work pool: with `shard_deployment` set, each shard of a build is a `build-shard` flow run.

Why `run_deployment` on a work pool rather than a Dask or Ray task runner: the workers are Prefect's own
(`prefect worker start`, `docker compose up --scale worker=N`), each shard is an ordinary flow run that
the UI shows, cancels and logs, the work pool hands each run to exactly one worker, and nothing is
shared but the Prefect server, the data dir and (for one rate limit) Redis: no second cluster to run.

A worker that dies mid-shard leaves its run `Running` with no heartbeats; the server's zombie
automation (flows/automations.py) marks it `Crashed`, and the build starts the shard again, on whichever
worker takes it. The new run reuses the rows and journaled calls the dead one stored, so what is paid
again is at most the calls that were in flight (and, on another machine, the journal's last unsealed
seconds).

`max_cost` holds across the runs: each run is given a part of what is neither spent nor held by the
runs in flight, so together they can never exceed it (a crashed run counts as having spent its part).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from facets.llm.errors import BudgetExceeded, RunAborted
from facets.llm.journal import Journal, default_writer_id
from facets.schemas.config import BuildConfig
from facets.schemas.shards import ShardProgress, ShardSpec, ShardSummary
from facets.storage import Store
from facets.schemas.stages import STAGE_NAMES
from facets.pipeline.shard import bucket_range

POLL_S = 2.0
FINAL_STATES = ["COMPLETED", "FAILED", "CANCELLED", "CRASHED"]
SUMMARIES = "builds"
PROGRESS = "progress"


class JournalScope:
    """The journal writers of one attempt of a dispatched build, tagged so that its shard runs skip each
    other's files: a shard run indexes the journal as it was before the build and what writers of its own
    bucket range added (an earlier run of it that crashed), not the other shards' calls, whose instructions
    are never its own. Without this each run would read every file sealed before it: quadratic in N.
    A retried build is a new attempt with a new tag, so it reads everything its first attempt journaled."""

    def __init__(self, tag: str):
        self.tag = tag

    @classmethod
    def of_attempt(cls, build: str, attempt: int) -> JournalScope:
        return cls("x" + hashlib.blake2b(f"{build}:{attempt}".encode(), digest_size=5).hexdigest())

    def journal(self, data_dir: str, lo: int | None = None, hi: int | None = None) -> Journal:
        """The build's journal (lo None: its own small shards), or a shard run's for bucket range [lo, hi]."""
        if lo is None:
            return Journal(data_dir, writer_id=self.writer())
        return Journal(data_dir, writer_id=self.writer(lo, hi), skip=self.skip_others(lo, hi))

    def writer(self, lo: int | None = None, hi: int | None = None) -> str:
        """The build's own writer (its small shards), or a shard run's writer for bucket range [lo, hi]."""
        ranged = "" if lo is None else f"b{lo:04d}-{hi:04d}-"
        return f"{self.tag}-{ranged}{default_writer_id()}"

    def skip_others(self, lo: int, hi: int) -> Callable[[str], bool]:
        """For a shard run of [lo, hi]: this build's files other than those of writers of an overlapping range."""
        prefix = f"{self.tag}-"

        def skip(stem: str) -> bool:
            if not stem.startswith(prefix):
                return False
            span = bucket_range(stem[len(prefix):])
            return span is None or span[0] > hi or span[1] < lo
        return skip


class ShardRunFailed(RuntimeError):
    """A shard run ended Failed or Cancelled, or crashed more often than `shard_retries` allows."""


def summary_parts(build: str, shard_key: str) -> tuple[str, str, str]:
    return SUMMARIES, build, f"{shard_key}.json"


def progress_parts(build: str, run_id: str | None = None, stage: str | None = None) -> tuple[str, ...]:
    """The folder of a build's stage reports, or one run's report of one stage (a name written once)."""
    folder = (SUMMARIES, build, PROGRESS)
    return folder if run_id is None else (*folder, f"{run_id}.{stage}.json")


class SpendSplit:
    """`max_cost` across concurrent shard runs: each takes a part of the money nobody spent or holds."""

    def __init__(self, max_cost: float | None, parts: int):
        self.max_cost, self.parts = max_cost, parts
        self.spent = 0.0
        self.held: dict[str, float] = {}

    def take(self, shard: str) -> float | None:
        if self.max_cost is None:
            return None
        free = self.max_cost - self.spent - sum(self.held.values())
        if free <= 0:
            raise BudgetExceeded(f"max_cost ${self.max_cost:.2f} reached: ${self.spent:.4f} spent by shard runs")
        self.held[shard] = free / max(1, self.parts - len(self.held))
        return self.held[shard]

    def settle(self, shard: str, cost: float | None) -> None:
        held = self.held.pop(shard, 0.0)
        self.spent += held if cost is None else cost


class RunWatcher:
    """Waits for many flow runs with one request per poll: the runs among them that reached a final state.

    `run_deployment` would poll each run on its own, and a shard run's parameters carry its instruction
    ids: ten runs in flight polled every 2 s were most of the Prefect server's requests and CPU. Asking
    only for the finished ones keeps each reply small as well."""

    def __init__(self, poll_s: float = POLL_S):
        self.poll_s = poll_s
        self.waiting: dict[str, asyncio.Future] = {}
        self._loop: asyncio.Task | None = None

    async def finished(self, run_id: str):
        """The flow run once it is Completed, Failed, Cancelled or Crashed."""
        future = asyncio.get_running_loop().create_future()
        self.waiting[str(run_id)] = future
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._poll())
        try:
            return await future
        finally:
            self.waiting.pop(str(run_id), None)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)

    async def _poll(self) -> None:
        from uuid import UUID

        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )

        async with get_client() as client:
            while self.waiting:
                await asyncio.sleep(self.poll_s)
                ids = [UUID(run_id) for run_id, future in self.waiting.items() if not future.done()]
                if not ids:
                    continue
                try:
                    done = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=ids),
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINAL_STATES))))
                except Exception as exc:  # noqa: BLE001 - the server may be restarting: ask again next poll
                    logging.getLogger(__name__).warning("reading the shard runs' states failed (%s); retrying", exc)
                    continue
                for run in done:
                    future = self.waiting.get(str(run.id))
                    if future is not None and not future.done():
                        future.set_result(run)


class ProgressWatcher:
    """Reads the stage reports of the shard runs in flight with one listing per poll, each report once.

    The build learns what a run's stages dropped while the run goes on (mostly its trees, early in the
    run), so the replacements run beside it: waiting for the run's end left every dispatched build with
    a tail of replacement rounds after its last runs."""

    def __init__(self, store: Store, build: str, poll_s: float = POLL_S):
        self.store, self.build, self.poll_s = store, build, poll_s
        self.listeners: dict[str, Callable[[ShardProgress], None]] = {}  # run id -> what to tell
        self._read: set[str] = set()
        self._loop: asyncio.Task | None = None

    def listen(self, run_id: str, listener: Callable[[ShardProgress], None]) -> None:
        self.listeners[run_id] = listener
        if self._loop is None or self._loop.done():
            self._loop = asyncio.create_task(self._poll())

    def forget(self, run_id: str) -> None:
        self.listeners.pop(run_id, None)

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)

    async def _poll(self) -> None:
        while self.listeners:
            await asyncio.sleep(self.poll_s)
            try:
                reports = await asyncio.to_thread(self.read_new, set(self.listeners))
            except Exception as exc:  # noqa: BLE001 - the store may be slow or away: the run's end still counts
                logging.getLogger(__name__).warning("reading the shard runs' stage reports failed (%s)", exc)
                continue
            for report in reports:  # told here, in the event loop: a listener may start shards
                if (listener := self.listeners.get(report.run)) is not None:
                    listener(report)

    def read_new(self, runs: set[str]) -> list[ShardProgress]:
        """The reports of `runs` not read before, in the order their stages ran."""
        folder = progress_parts(self.build)
        reports = []
        for name in self.store.names(*folder):
            if name in self._read or name.split(".", 1)[0] not in runs:
                continue
            self._read.add(name)
            if text := self.store.read_text(*folder, name):
                reports.append(ShardProgress.model_validate_json(text))
        return sorted(reports, key=lambda report: STAGE_NAMES.index(report.stage))


class ShardDispatch:
    """Starts a shard's run on the deployment, waits for it, and takes its summary; crashed runs go again."""

    def __init__(self, config: BuildConfig, store: Store, build: str, scope: JournalScope):
        self.config, self.store, self.build, self.scope = config, store, build, scope
        self.deployment = config.shard_deployment
        self.watcher = RunWatcher()
        self.progress = ProgressWatcher(store, build)
        self.spend = SpendSplit(config.endpoint.max_cost, config.max_concurrent_shards)
        self.usage: list[dict[str, dict[str, Any]]] = []
        self.crashed = 0
        # few shards make trees at once, across all workers (see build_shards): Prefect's own semaphore
        self.tree_limit = f"facets-trees-{build}"

    async def open(self) -> None:
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            await client.upsert_global_concurrency_limit_by_name(self.tree_limit, self.config.max_tree_shards)

    async def close(self) -> None:
        from prefect.client.orchestration import get_client

        await self.watcher.close()
        await self.progress.close()
        try:
            async with get_client() as client:
                await client.delete_global_concurrency_limit_by_name(self.tree_limit)
        except Exception:  # noqa: BLE001 - a leftover limit of a finished build holds nothing
            pass

    def shard_config(self, max_cost: float | None) -> dict[str, Any]:
        """The build's config for one shard run: no ingest, no release, no dispatch, no key in the
        parameters (a worker takes OPENAI_API_KEY from its own environment), its part of max_cost."""
        config = self.config.model_dump(mode="json", exclude={"endpoint": {"api_key"}})
        config.update(sources=[], limit=None, publish=False, push_to_hub=None, train_after=False,
                      shard_deployment=None)
        config["endpoint"]["max_cost"] = max_cost
        return config

    async def run(self, spec: ShardSpec, on_progress: Callable[[ShardProgress], None] | None = None) -> ShardSummary:
        """The shard's summary once a run of it finished; `on_progress` hears each stage's end meanwhile."""
        from prefect import get_run_logger
        from prefect.deployments import run_deployment

        for attempt in range(self.config.shard_retries + 1):
            parameters = {"config": self.shard_config(self.spend.take(spec.key)), "shard": spec.model_dump()}
            run = await run_deployment(self.deployment, parameters=parameters, timeout=0,
                                       flow_run_name=f"{spec.key}-{attempt}", tags=self.tags())
            run_id = str(run.id)
            if on_progress is not None:
                self.progress.listen(run_id, on_progress)
            try:
                run = await self.watcher.finished(run.id)
            finally:
                self.progress.forget(run_id)
            summary = self.read_summary(spec, str(run.id))
            self.spend.settle(spec.key, _cost(summary))
            if run.state.is_completed() and summary is not None and summary.error is None:
                self.usage.append(summary.usage)
                return summary
            if summary is not None and summary.aborted:
                raise RunAborted(f"shard {spec.name} (run {run.id}): {summary.error}")
            if run.state.is_crashed() and attempt < self.config.shard_retries:
                self.crashed += 1
                get_run_logger().warning("shard %s: run %s crashed (%s); starting it again", spec.name, run.id,
                                         run.state.message)
                continue
            reason = summary.error if summary is not None and summary.error else run.state.message
            raise ShardRunFailed(f"shard {spec.name}: run {run.id} ended {run.state.type.value}: {reason}")
        raise AssertionError("unreachable")

    def read_summary(self, spec: ShardSpec, run_id: str) -> ShardSummary | None:
        text = self.store.read_text(*summary_parts(self.build, spec.key))
        summary = ShardSummary.model_validate_json(text) if text else None
        return summary if summary is not None and summary.run == run_id else None

    def tags(self) -> list[str]:
        return ["facets", "build-shard", f"build:{self.build}"]

    async def cancel_outstanding(self) -> int:
        """Cancels this build's shard runs that have not finished (the build stopped or was cancelled)."""
        return await cancel_shard_runs(self.build)


async def cancel_shard_runs(build: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.states import Cancelling

    open_types = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
    cancelled = 0
    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"build:{build}"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=open_types))))
        for run in runs:
            await client.set_flow_run_state(run.id, Cancelling(message=f"build {build} stopped"), force=True)
            cancelled += 1
    return cancelled


def _cost(summary: ShardSummary | None) -> float | None:
    """What a run spent, None when unknown (no summary: it crashed; the split then counts its whole part)."""
    if summary is None:
        return None
    costs = [usage.get("cost_usd") for usage in summary.usage.values()]
    return None if any(c is None for c in costs) else float(sum(costs))
