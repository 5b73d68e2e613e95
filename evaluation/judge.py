"""Judging: absolute 1-5 grading of each response on each of its item's 4 rubrics, in N runs, and the summary.

The judge prompt (`judge.txt` beside this module) is the Janus evaluation script's, word for word (its
grammar included), with the same rendering: the user turn stripped at both ends and the rubric as JSON
with indent 4 and ASCII escapes. It shows the instruction, the response, the reference answer and one
rubric, never the system message: the preferences reach the judge through the rubric and the reference. A reply must end in `[RESULT] n` (a `Score: n` is taken too); one that does not
is asked again up to `reasks` times (default 5), then kept as a failure with its raw output. Each judge
call is journaled, and each judgment is stored with its feedback, so a rerun pays only for what is missing.

Scores: an item's score is the mean of its 4 rubric scores, averaged over the runs; a benchmark's is the
mean over its items; `Average` is the mean over all items (the benchmarks weighted by their size, which
is how the paper's Avg column sits: below the mean of its five columns, toward mf-FLASK, the largest).
An item counts only when every (run, rubric) was scored: a model with failed items shows how many of its
items were scored, and its averages cover only those; it is never silently averaged as if complete.
"""
from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pyarrow as pa
import pyarrow.dataset as ds

from facets.llm.batch import BatchItem, BatchRunner
from facets.llm.gateway import Call, Gateway
from facets.llm.journal import Journal
from facets.schemas import Rubric, fingerprint, from_table, to_table
from facets.schemas.evaluation import BENCHMARKS, EvalConfig, EvalResponse, Judgment
from facets.storage import Store
from facets.evaluation.bench_release import Bench, BenchItem
from facets.evaluation.paper_table import SOURCE as PUBLISHED_SOURCE
from facets.evaluation.paper_table import TABLE_2, PublishedRow, comparability_notes, picture_rows
from facets.tasks.templates import Template, load_template

STAGE = "judge"
TEMPLATE = "judge"
JUDGE_PROMPT_DIR = Path(__file__).parent
RUBRICS_PER_ITEM = 4
AVERAGE = "Average"
COLUMNS = [*BENCHMARKS.values(), AVERAGE]

_RESULT = re.compile(r"\[RESULT\][\s*:=\-]*[(\[]?\s*(\d+(?:\.\d+)?)", re.IGNORECASE)
_SCORE = re.compile(r"\bscore\b\s*(?:is|of)?[\s*:=]*[(\[]?\s*(\d+(?:\.\d+)?)(?!\s*(?:to|-|\u2013)\s*\d)", re.IGNORECASE)
_FEEDBACK = re.compile(r"^\s*(?:#+\s*)?\**feedback\**\s*:\s*\**", re.IGNORECASE)


# -- parsing -------------------------------------------------------------------------------------------
def _value(text: str) -> int | None:
    number = float(text)
    return int(number) if number.is_integer() and 1 <= number <= 5 else None


def parse_score(text: str) -> int | None:
    """The 1-5 score of a judge reply: the last `[RESULT] n`; without one, the last `Score: n`; else None.
    A last marker with anything but an integer 1-5 after it gives None (asked again)."""
    results = list(_RESULT.finditer(text))
    if results:
        return _value(results[-1][1])
    scores = list(_SCORE.finditer(text))
    return _value(scores[-1][1]) if scores else None


def parse_judgment(text: str) -> tuple[int, str]:
    """(score, feedback); ValueError for a reply without a usable score (the gateway asks again)."""
    score = parse_score(text)
    if score is None:
        raise ValueError("no score found: end the reply with `[RESULT] n`, n an integer from 1 to 5")
    marks = list(_RESULT.finditer(text)) or list(_SCORE.finditer(text))
    feedback = _FEEDBACK.sub("", text[: marks[-1].start()]).strip()
    return score, feedback


def check_judgment(text: str) -> None:
    parse_judgment(text)


# -- the judge's calls ---------------------------------------------------------------------------------
class JudgeGateway(Gateway):
    """A judge reply a batch returned unparseable is asked again online `reasks` times, like an online one."""

    def __init__(self, *args, reasks: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.reasks = reasks

    async def repair(self, call, stage, key, rejected, content, attempts: int | None = None):
        return await super().repair(call, stage, key, rejected, content, self.reasks if attempts is None else attempts)


def rubric_text(rubric: Rubric) -> str:
    """The rubric as the Janus script writes it: `json.dumps(rubric, indent=4)`."""
    return json.dumps({"criteria": rubric.criteria, "score_descriptions": rubric.score_descriptions.model_dump(by_alias=True)},
                      indent=4)


def judge_messages(template: Template, item: BenchItem, response: str, rubric: Rubric) -> list[dict]:
    """The judge sees the instruction, the response, the reference answer and one rubric: no system message."""
    system, user = template.messages(instruction=item.prompt, response=response, reference_answer=item.reference_answer,
                                     rubric=rubric_text(rubric))
    return [system, {**user, "content": user["content"].strip()}]


def load_judge_template(directory: str | None = None) -> Template:
    """A user's `judge.txt` in `directory` when there is one, else the bundled one beside this module."""
    own = directory is not None and (Path(directory) / f"{TEMPLATE}.txt").is_file()
    return load_template(TEMPLATE, directory if own else JUDGE_PROMPT_DIR)


def eval_dir(store: Store, bench_version: str, *parts: str) -> str:
    return store.path("evals", bench_version, *parts)


def _read(store: Store, directory: str, model, labels: list[str] | None = None) -> list:
    files = store.parquet_files(directory)
    if not files:
        return []
    dataset = ds.dataset(files, format="parquet", filesystem=store.fs)
    table = dataset.to_table(filter=ds.field("model").isin(labels)) if labels is not None else dataset.to_table()
    return from_table(table, model)


def latest_responses(store: Store, bench_version: str, labels: list[str] | None = None) -> dict[str, dict[str, EvalResponse]]:
    """label -> item id -> the newest response stored for it."""
    out: dict[str, dict[str, EvalResponse]] = defaultdict(dict)
    for row in sorted(_read(store, eval_dir(store, bench_version, "responses"), EvalResponse, labels),
                      key=lambda r: r.created_at):
        out[row.model][row.item_id] = row
    return dict(out)


def response_labels(store: Store, bench_version: str) -> list[str]:
    return sorted(latest_responses(store, bench_version))


@dataclass
class JudgeTodo:
    label: str
    item: BenchItem
    response: EvalResponse
    run: int
    rubric_index: int
    fingerprint: str
    call: Call | None = None

    @property
    def key(self) -> str:
        return f"{self.label}#{self.item.item_id}#r{self.run}#k{self.rubric_index}"


@dataclass
class JudgeReport:
    bench_version: str
    judged: int = 0          # new judgments
    reused: int = 0          # judgments found stored
    failed: int = 0          # judge calls that gave no usable score
    missing_responses: dict[str, int] = field(default_factory=dict)
    usage: dict = field(default_factory=dict)
    summary: list["ModelSummary"] = field(default_factory=list)
    published: list[PublishedRow] = field(default_factory=list)   # the paper's Table 2, on the published bench
    notes: list[str] = field(default_factory=list)                # why this run is not measured as the paper's
    outputs: dict[str, str] = field(default_factory=dict)


def _sampling(config: EvalConfig, run: int):
    base = config.judge.sampling
    return base.model_copy(update={"seed": (base.seed if base.seed is not None else config.seed) + run})


async def judge_models(config: EvalConfig, bench: Bench, labels: list[str], store: Store,
                       preflight: bool = True) -> JudgeReport:
    """Judge the stored responses of `labels` on the bench, write judgments, failures and the summary."""
    from facets.llm.preflight import check_endpoint

    judge = config.judge
    items = bench.first(config.limit)
    template = load_judge_template(judge.templates_dir)
    responses = latest_responses(store, bench.version, labels)
    stored = {j.fingerprint: j for j in _read(store, eval_dir(store, bench.version, "judgments"), Judgment, labels)}
    judge_model = judge.endpoint.model
    report = JudgeReport(bench.version)
    todos: list[JudgeTodo] = []
    for label in labels:
        got = responses.get(label, {})
        report.missing_responses[label] = sum(1 for item in items if item.item_id not in got)
        for item in items:
            response = got.get(item.item_id)
            if response is None:
                continue
            for run in range(judge.runs):
                for k, rubric in enumerate(item.rubrics):
                    fp = fingerprint(STAGE, response.fingerprint, item.item_id, rubric_text(rubric), template.version,
                                     judge_model, _sampling(config, run).request_fields(), run, k)
                    todos.append(JudgeTodo(label, item, response, run, k, fp))
    found = [stored[t.fingerprint] for t in todos if t.fingerprint in stored]
    todo = [t for t in todos if t.fingerprint not in stored]
    report.reused = len(found)
    made: list[Judgment] = []
    if todo:
        if preflight:
            await check_endpoint(judge.endpoint, [judge_model])
        gateway = JudgeGateway(judge.endpoint, Journal(config.data_dir), reasks=judge.reasks)
        runner = BatchRunner(gateway, config.data_dir, poll_initial_s=judge.batch_poll_s) if judge.mode == "batch" else None
        try:
            for t in todo:
                t.call = gateway.prepare(judge_messages(template, t.item, t.response.text, t.item.rubrics[t.rubric_index]),
                                         _sampling(config, t.run), check=check_judgment, salt=f"judge-run-{t.run}")
            if runner is not None:
                by_key = await runner.run([BatchItem(t.call, STAGE, t.key) for t in todo])
                results = [by_key.get(t.key) for t in todo]
            else:
                results = await asyncio.gather(*(gateway.run(t.call, STAGE, t.key, judge.reasks) for t in todo))
            for t, done in zip(todo, results):
                if done is None:
                    continue
                score, feedback = parse_judgment(done.value)
                made.append(Judgment(item_id=t.item.item_id, model=t.label, bench_version=bench.version,
                                     benchmark=t.item.benchmark, source=t.item.source, run=t.run,
                                     rubric_index=t.rubric_index, score=score, feedback=feedback,
                                     judge_model=judge_model, response_fingerprint=t.response.fingerprint,
                                     fingerprint=t.fingerprint))
            failures = gateway.drain_failures()
            if failures:
                store.write_failures(failures, label="judge")
            report.failed = len(todo) - len(made)
            report.usage = gateway.usage.summary()
        finally:
            if runner is not None:
                await runner.aclose()
            await gateway.aclose()
            gateway.journal.close()
        if made:
            store.write_table(eval_dir(store, bench.version, "judgments"), to_table(made, Judgment), label="judge")
    report.judged = len(made)
    judgments: dict[str, list[Judgment]] = defaultdict(list)
    for j in [*found, *made]:
        judgments[j.model].append(j)
    report.summary = summarise(items, judgments, labels, judge.runs)
    if bench.published:
        report.published = list(TABLE_2)
        report.notes = comparability_notes(len(items), judge_model, judge.runs)
    report.outputs = write_summary(store, bench.version, report.summary,
                                   item_scores(items, judgments, labels, judge.runs, responses), report.published,
                                   report.notes)
    return report


# -- scores --------------------------------------------------------------------------------------------
@dataclass
class Cell:
    score: float | None
    scored: int
    total: int

    @property
    def complete(self) -> bool:
        return self.scored == self.total


@dataclass
class ModelSummary:
    model: str
    cells: dict[str, Cell]   # column (mf-..., Average) -> cell

    @property
    def coverage(self) -> Cell:
        return self.cells[AVERAGE]


def _item_score(scores: dict[tuple[int, int], int], runs: int, rubrics: int = RUBRICS_PER_ITEM) -> float | None:
    """Mean over runs of the mean of the rubric scores; None unless every (run, rubric) was scored."""
    if any((run, k) not in scores for run in range(runs) for k in range(rubrics)):
        return None
    return sum(sum(scores[(run, k)] for k in range(rubrics)) / rubrics for run in range(runs)) / runs


def _by_item(judgments: list[Judgment]) -> dict[str, dict[tuple[int, int], int]]:
    out: dict[str, dict[tuple[int, int], int]] = defaultdict(dict)
    for j in judgments:
        out[j.item_id].setdefault((j.run, j.rubric_index), j.score)
    return out


def summarise(items: list[BenchItem], judgments: dict[str, list[Judgment]], labels: list[str], runs: int) -> list[ModelSummary]:
    """One row per model: each benchmark's mean item score and the Average over all items, with coverage."""
    summaries = []
    for label in labels:
        by_item = _by_item(judgments.get(label, []))
        per_column: dict[str, list[float | None]] = {column: [] for column in COLUMNS}
        for item in items:
            score = _item_score(by_item.get(item.item_id, {}), runs)
            per_column[BENCHMARKS[item.benchmark]].append(score)
            per_column[AVERAGE].append(score)
        cells = {}
        for column, scores in per_column.items():
            done = [s for s in scores if s is not None]
            cells[column] = Cell(sum(done) / len(done) if done else None, len(done), len(scores))
        summaries.append(ModelSummary(label, cells))
    return summaries


def item_scores(items: list[BenchItem], judgments: dict[str, list[Judgment]], labels: list[str], runs: int,
                responses: dict[str, dict[str, EvalResponse]]) -> pa.Table:
    """Per (model, item): its score (null unless complete), judgments found of those expected, and why not."""
    columns: dict[str, list] = {c: [] for c in ("model", "item_id", "benchmark", "source", "score", "judged", "expected", "status")}
    for label in labels:
        by_item = _by_item(judgments.get(label, []))
        for item in items:
            scores = by_item.get(item.item_id, {})
            score = _item_score(scores, runs)
            has_response = item.item_id in responses.get(label, {})
            status = "scored" if score is not None else ("judge failed" if has_response else "no response")
            for name, value in (("model", label), ("item_id", item.item_id), ("benchmark", item.benchmark),
                                ("source", item.source), ("score", score), ("judged", len(scores)),
                                ("expected", runs * RUBRICS_PER_ITEM), ("status", status)):
                columns[name].append(value)
    schema = pa.schema([("model", pa.string()), ("item_id", pa.string()), ("benchmark", pa.string()),
                        ("source", pa.string()), ("score", pa.float64()), ("judged", pa.int64()),
                        ("expected", pa.int64()), ("status", pa.string())])
    return pa.table(columns, schema=schema)


# -- the summary: Markdown, CSV, PNG -------------------------------------------------------------------
def _cell_text(cell: Cell) -> str:
    if cell.total == 0:
        return "-"
    if cell.score is None:
        return f"n/a ({cell.scored}/{cell.total})"
    return f"{cell.score:.2f}" if cell.complete else f"{cell.score:.2f} ({cell.scored}/{cell.total})"


def coverage_text(cell: Cell) -> str:
    share = 100.0 * cell.scored / cell.total if cell.total else 0.0
    return f"{cell.scored}/{cell.total} ({share:.1f}%)"


def summary_markdown(summaries: list[ModelSummary], published: Sequence[PublishedRow] = (),
                     notes: Sequence[str] = ()) -> str:
    """The models judged here, then (on the published bench) the paper's Table 2 rows, labelled published."""
    header = ["Model", *COLUMNS, "Coverage"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        lines.append("| " + " | ".join([s.model, *(_cell_text(s.cells[c]) for c in COLUMNS), coverage_text(s.coverage)]) + " |")
    for row in published:
        lines.append("| " + " | ".join([row.label, *(f"{row.scores[c]:.2f}" for c in COLUMNS), "published"]) + " |")
    if any(not s.coverage.complete for s in summaries):
        lines += ["", "A score with (k/n) averages only the k of n items that were scored in every run and on every "
                      "rubric; the other items failed (no response, or the judge gave no usable score) and are "
                      "listed in scores.parquet and the failures table."]
    if published:
        lines += ["", f"Rows marked (published) are the paper's figures, not measured here: {PUBLISHED_SOURCE}."]
        lines += [f"Not measured alike: {note}." for note in notes]
    return "\n".join(lines) + "\n"


def summary_rows(summaries: list[ModelSummary], published: Sequence[PublishedRow] = ()) -> list[dict]:
    """One dict per model judged (`kind` judged), then one per published row (`kind` published, no counts)."""
    rows = []
    for s in summaries:
        row: dict = {"model": s.model, "kind": "judged"}
        for column in COLUMNS:
            score = s.cells[column].score
            row[column] = None if score is None else round(score, 4)
        row.update(scored=s.coverage.scored, total=s.coverage.total,
                   coverage=round(s.coverage.scored / s.coverage.total, 4) if s.coverage.total else 0.0)
        for column in BENCHMARKS.values():
            row[f"{column} scored"] = s.cells[column].scored
            row[f"{column} total"] = s.cells[column].total
        rows.append(row)
    for p in published:
        rows.append({"model": p.label, "kind": "published", **{c: p.scores[c] for c in COLUMNS}})
    return rows


def summary_csv(summaries: list[ModelSummary], published: Sequence[PublishedRow] = ()) -> str:
    rows = summary_rows(summaries, published)
    buffer = io.StringIO()
    fields = list(summary_rows(summaries[:1])[0]) if summaries else ["model", "kind", *COLUMNS, "scored", "total", "coverage"]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in fields})
    return buffer.getvalue()


def summary_png(summaries: list[ModelSummary], title: str = "Multifaceted Bench",
                published: Sequence[PublishedRow] = ()) -> bytes:
    """Grouped bars: one group per benchmark and Average, one bar per model; hatched where coverage < 100%.
    The paper's rows (published bench only) follow in grey tones, labelled published."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = picture_rows(published)
    bars_per_group = max(1, len(summaries) + len(shown))
    figure = Figure(figsize=(max(8, 0.3 * bars_per_group * len(COLUMNS) + 2), 5.2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    width = 0.84 / bars_per_group

    def positions(index: int) -> list[float]:
        return [c + (index - (bars_per_group - 1) / 2) * width for c in range(len(COLUMNS))]

    for index, s in enumerate(summaries):
        cells = [s.cells[c] for c in COLUMNS]
        heights = [cell.score if cell.score is not None else 0.0 for cell in cells]
        bars = axes.bar(positions(index), heights, width,
                        label=s.model if s.coverage.complete else f"{s.model} ({coverage_text(s.coverage)})")
        for bar, cell in zip(bars, cells):
            if not cell.complete:
                bar.set_hatch("//")
            if cell.score is not None:
                axes.annotate(f"{cell.score:.2f}", (bar.get_x() + bar.get_width() / 2, cell.score), ha="center",
                              va="bottom", fontsize=6 if bars_per_group > 4 else 7)
    greys = colormaps["Greys"]
    for offset, row in enumerate(shown):
        colour = greys(0.3 + 0.5 * offset / max(1, len(shown) - 1))
        axes.bar(positions(len(summaries) + offset), [row.scores[c] for c in COLUMNS], width, color=colour,
                 edgecolor="black", linewidth=0.4, label=row.label)
    axes.set_xticks(range(len(COLUMNS)), COLUMNS, fontsize=8)
    axes.set_ylim(0, 5.4)
    axes.set_ylabel("score (1-5)")
    axes.set_title(title + ("  (hatched: not every item scored)" if any(not s.coverage.complete for s in summaries) else ""),
                   fontsize=10)
    if summaries or shown:
        axes.legend(fontsize=7, loc="lower right", ncol=2 if len(summaries) + len(shown) > 6 else 1)
    if shown:
        figure.text(0.01, 0.01, "grey: the paper's Table 2 (published, not measured here)", fontsize=7)
    figure.tight_layout(rect=(0, 0.03 if shown else 0, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def write_summary(store: Store, bench_version: str, summaries: list[ModelSummary], scores: pa.Table,
                  published: Sequence[PublishedRow] = (), notes: Sequence[str] = ()) -> dict[str, str]:
    """summary.md, summary.csv, summary.png and scores.parquet under evals/<bench version>/; their paths."""
    import pyarrow.parquet as pq

    directory = eval_dir(store, bench_version)
    store.fs.makedirs(directory, exist_ok=True)
    title = f"Multifaceted Bench {bench_version}"
    outputs = {"markdown": f"{directory}/summary.md", "csv": f"{directory}/summary.csv",
               "png": f"{directory}/summary.png", "scores": f"{directory}/scores.parquet"}
    markdown = summary_markdown(summaries, published, notes)
    store.fs.pipe_file(outputs["markdown"], (f"# {title}\n\n" + markdown).encode("utf-8"))
    store.fs.pipe_file(outputs["csv"], summary_csv(summaries, published).encode("utf-8"))
    store.fs.pipe_file(outputs["png"], summary_png(summaries, title, published))
    buffer = io.BytesIO()
    pq.write_table(scores, buffer, compression="zstd")
    store.fs.pipe_file(outputs["scores"], buffer.getvalue())
    return outputs
