"""What a build reports: progress while it runs, and a summary (Prefect artifacts and text) at the end."""
from __future__ import annotations

import base64
import contextlib
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from facets.llm.dialects import DIALECTS, describe
from facets.release.markdown import markdown_table
from facets.schemas.stages import STAGE_NAMES

log = logging.getLogger(__name__)


# Who watches a build's progress in this context (the CLI's progress bar): flow parameters must stay
# serialisable, so a listener is set around the flow call instead of passed to it.
_LISTENERS: ContextVar[tuple[Callable[["Progress"], None], ...]] = ContextVar("progress_listeners", default=())


@contextlib.contextmanager
def listening(listener: Callable[["Progress"], None]) -> Iterator[None]:
    token = _LISTENERS.set((*_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def progress_listeners() -> tuple[Callable[["Progress"], None], ...]:
    return _LISTENERS.get()


@dataclass
class Progress:
    """(stage, shard) units done of those planned; listeners see every step, Prefect a throttled bar.

    Replacement shards grow `total` mid-build, so `done / total` would drop (7/10, then 8/15). The
    shown `fraction` never goes back: when the total grows, the fraction reached so far is kept and only
    the work left is spread over the remaining share of the bar."""

    listeners: list[Callable[["Progress"], None]] = field(default_factory=list)
    total: int = 0
    done: int = 0
    instructions: int = 0
    last: str = ""
    started: float = field(default_factory=time.monotonic)
    _artifact: Any = None
    _pushed: float = 0.0
    _base_fraction: float = 0.0  # the fraction shown when the total last grew
    _base_done: int = 0  # units done then

    def add(self, units: int, instructions: int) -> None:
        self._base_fraction, self._base_done = self.fraction, self.done
        self.total += units
        self.instructions += instructions

    async def advance(self, stage: str, shard) -> None:
        self.done += 1
        self.last = f"{stage} {shard.title}"
        for listener in self.listeners:
            listener(self)
        if self.done == self.total or time.monotonic() - self._pushed > 2.0:
            self._pushed = time.monotonic()
            await self._push()

    @property
    def fraction(self) -> float:
        """Share of the bar filled: never decreases, and reaches 1.0 when every planned unit is done."""
        if self.done >= self.total:
            return 1.0 if self.total else 0.0
        left_then = self.total - self._base_done  # > 0: base_done <= done < total
        return self._base_fraction + (1 - self._base_fraction) * (self.done - self._base_done) / left_then

    async def _push(self) -> None:
        from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact

        try:
            if self._artifact is None:
                self._artifact = await acreate_progress_artifact(100 * self.fraction, key="build-progress",
                                                                 description="(stage, shard) tasks done")
            else:
                await aupdate_progress_artifact(self._artifact, 100 * self.fraction)
        except Exception as exc:  # progress is a courtesy: never fail a build for it
            log.debug("progress artifact not updated: %s", exc)


class BuildReport(BaseModel):
    wanted: int
    accepted: int
    drawn: int
    shards: int
    stages: dict[str, dict[str, int]]
    failures: dict[str, int]
    usage: dict[str, dict[str, Any]]
    seconds: float
    reruns: int = 0  # shard runs started again because their worker died (shard_deployment)
    structured_output: str | None = None  # the dialect structured calls used (llm/dialects.py)
    release: dict[str, Any] | None = None

    @classmethod
    def collect(cls, summaries: list, usage: dict[str, dict[str, Any]], wanted: int, seconds: float) -> "BuildReport":
        """The build's figures: the sums of its shards' summaries (`ShardSummary`, wherever a shard ran)."""
        stages = {stage: Counter() for stage in STAGE_NAMES}
        for summary in summaries:
            for stage, count in summary.counts.items():
                stages[stage].update(count)
        failures = sum((Counter(s.failures) for s in summaries), Counter())
        return cls(
            wanted=wanted, accepted=sum(len(s.accepted) for s in summaries),
            drawn=sum(s.drawn for s in summaries), shards=len(summaries),
            stages={stage: {k: c[k] for k in ("reused", "made", "failed")} for stage, c in stages.items()},
            failures=dict(failures.most_common()),
            usage=usage, seconds=round(seconds, 3),
        )

    @property
    def requests(self) -> int:
        return sum(u["requests"] for u in self.usage.values())

    @property
    def cost(self) -> float | None:
        costs = [u["cost_usd"] for u in self.usage.values()]
        return None if any(c is None for c in costs) else round(sum(costs), 4)

    def rows(self) -> list[dict[str, Any]]:
        """One row per stage: reused, made, failed, requests, tokens, cost."""
        table = []
        for stage, counts in self.stages.items():
            usage = self.usage.get(stage, {})
            table.append({
                "stage": stage, **counts,
                "requests": usage.get("requests", 0), "rate_limited": usage.get("rate_limited", 0),
                "prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
                "cost_usd": "unknown" if usage and usage.get("cost_usd") is None else usage.get("cost_usd", 0.0),
            })
        return table

    def text(self) -> str:
        rows = self.rows()
        header = list(rows[0])
        widths = [max(len(str(h)), *(len(str(r[h])) for r in rows)) for h in header]
        lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(str(r[h]).ljust(w) for h, w in zip(header, widths)) for r in rows]
        cost = "unknown (a model has no price)" if self.cost is None else f"${self.cost:.4f}"
        rate = self.requests / self.seconds if self.seconds else 0.0
        lines.append(f"accepted {self.accepted} of {self.wanted} wanted ({self.drawn} drawn, {self.shards} shards) "
                     f"in {self.seconds:.1f}s; {self.requests} requests ({rate:.1f}/s), cost {cost}")
        if self.reruns:
            lines.append(f"{self.reruns} shard runs crashed (their worker died) and ran again")
        if self.structured_output in DIALECTS:
            lines.append(f"structured output: {describe(self.structured_output)}")
        if self.failures:
            lines.append("failures: " + ", ".join(f"{reason} x{n}" for reason, n in self.failures.items()))
        if self.release:
            state = "new release" if self.release["is_new"] else "unchanged, no new release"
            lines.append(f"release {self.release['version']} ({state}): {self.release['path']}")
        return "\n".join(lines)

    def markdown(self, files: "ReleaseFiles | None" = None) -> str:
        """The report as Prefect's UI shows it: tables per stage, failures by reason, cost and time, the release."""
        cost = "unknown (a model has no price)" if self.cost is None else f"${self.cost:.4f}"
        rate = self.requests / self.seconds if self.seconds else 0.0
        out = [f"## Build: {self.accepted} of {self.wanted} instructions accepted", ""]
        facts = [("instructions drawn", f"{self.drawn:,}"), ("shards", f"{self.shards:,}"),
                 ("time", f"{self.seconds:,.1f} s"), ("requests", f"{self.requests:,} ({rate:.1f}/s)"), ("cost", cost)]
        if self.structured_output in DIALECTS:
            facts.append(("structured output", describe(self.structured_output)))
        if self.reruns:
            facts.append(("shard runs started again (their worker died)", str(self.reruns)))
        out += [markdown_table(["build", ""], facts), "", "### Stages", ""]
        rows = [(r["stage"], f"{r['reused']:,}", f"{r['made']:,}", f"{r['failed']:,}", f"{r['requests']:,}",
                 f"{r['rate_limited']:,}", f"{r['prompt_tokens']:,}", f"{r['completion_tokens']:,}",
                 r["cost_usd"] if isinstance(r["cost_usd"], str) else f"{r['cost_usd']:.4f}") for r in self.rows()]
        out += [markdown_table(["stage", "reused", "made", "failed", "requests", "429s", "prompt tokens",
                                "completion tokens", "cost (USD)"], rows), "", "### Failures by reason", ""]
        if self.failures:
            out += [markdown_table(["reason", "rows"], [(r, f"{n:,}") for r, n in self.failures.items()]), ""]
        else:
            out += ["None in this run.", ""]
        if self.release:
            state = "a new release" if self.release["is_new"] else "unchanged: no new release"
            out += ["### Release", "", f"`{self.release['version']}` ({state}) at `{self.release['path']}`; its card "
                    f"(`README.md` there) is the artifact `release-{self.release['version'].lower()}`.", ""]
            if files is not None:
                out += [files.picture("sunburst.png", "Sunburst of dimension, subdimension and preference"), ""]
        return "\n".join(out)


async def publish_artifacts(report: BuildReport) -> None:
    """`build-summary` (a table), `build-report` (markdown tables, the release and its sunburst) and, for a
    new release, `release-<version>`: its card as the UI shows it, one artifact per release. A rebuild that
    changed nothing names its release without storing the pictures again."""
    from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

    await acreate_table_artifact(report.rows(), key="build-summary", description="per stage: rows reused, made, failed; calls")
    new = report.release and report.release["is_new"]
    files = ReleaseFiles(report.release["path"]) if new else None
    await acreate_markdown_artifact(report.markdown(files), key="build-report", description="build-collection summary")
    if files is not None:
        version = report.release["version"]
        await acreate_markdown_artifact(files.card_markdown(version), key=f"release-{version.lower()}",
                                        description=f"the dataset card of release {version}")


class ReleaseFiles:
    """The card and sunburst of a published release, read where it lies (a local path or an fsspec URI),
    made to show in Prefect's UI: pictures inline as data URIs, links to the release's files as paths."""

    MAX_INLINE_BYTES = 2_000_000  # larger pictures are named by path rather than stored in the artifact

    def __init__(self, path: str):
        self.path = path.rstrip("/")

    def _read(self, name: str) -> bytes | None:
        import fsspec

        try:
            with fsspec.open(f"{self.path}/{name}", "rb") as handle:
                return handle.read()
        except (OSError, ValueError) as exc:
            log.debug("release file %s not read: %s", name, exc)
            return None

    def picture(self, name: str, alt: str) -> str:
        data = self._read(name)
        if data is None or len(data) > self.MAX_INLINE_BYTES:
            return f"{alt}: `{self.path}/{name}`"
        return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode()})"

    def card_markdown(self, version: str) -> str:
        card = (self._read("README.md") or b"").decode("utf-8", errors="replace")
        body = _FRONT_MATTER.sub("", card, count=1)
        body = _PICTURE.sub(lambda m: self.picture(m[2], m[1]), body)
        body = _LINK.sub(lambda m: f"{m[1]} (`{self.path}/{m[2]}`)", body)
        return f"Release `{version}` at `{self.path}` (this is its `README.md`).\n\n{body or '(no card found)'}"


_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.S)
_PICTURE = re.compile(r"!\[([^\]]*)\]\(((?:[\w.-]+/)*[\w.-]+\.png)\)")  # a picture in the release folder
_LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(((?:[\w.-]+/)*[\w.-]+\.(?:html|json|md))\)")  # a file in it
