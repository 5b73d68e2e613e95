"""The paper's Table 2: published Multifaceted Bench scores, shown beside the models judged here.

Figures as printed in Table 2 of Lee et al. (arXiv 2405.17977, v1): GPT-4-Turbo-0125 as judge, absolute 1-5
scores, the mean of 3 runs, on all 921 items of the published bench. They stand beside a run's own scores
only when that run evaluated the published bench; a run on part of it (`--limit`), or judged by another
model, says so under the table, since its numbers are then not measured the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from facets.schemas.evaluation import BENCHMARKS, JUDGE_MODEL

PUBLISHED_ITEMS = 921
SOURCE = "Lee et al. 2024, Table 2 (arXiv 2405.17977 v1): GPT-4-Turbo-0125 judge, mean of 3 runs, 921 items"
_ORDER = (*BENCHMARKS.values(), "Average")


@dataclass(frozen=True)
class PublishedRow:
    model: str
    scores: dict[str, float]   # column (mf-..., Average) -> score

    @property
    def label(self) -> str:
        return f"{self.model} (published)"


def _row(model: str, *values: float) -> PublishedRow:
    return PublishedRow(model, dict(zip(_ORDER, values, strict=True)))


# mf-AlpacaEval, mf-FLASK, mf-Koala, mf-MT-Bench, mf-Self-Instruct, Avg
TABLE_2: tuple[PublishedRow, ...] = (
    _row("Mistral 7B v0.2", 2.80, 1.93, 2.45, 2.30, 2.28, 2.23),
    _row("LLaMA 3 8B", 2.60, 2.92, 2.69, 2.39, 2.34, 2.54),
    _row("LLaMA 3 70B", 3.76, 3.23, 3.67, 3.50, 3.65, 3.49),
    _row("LLaMA 2 Chat 70B", 3.98, 3.68, 4.11, 3.66, 3.87, 3.79),
    _row("Mistral 7B Instruct v0.2", 4.20, 3.82, 4.18, 3.82, 3.98, 3.93),
    _row("Mixtral 8x7B Instruct v0.1", 4.24, 3.90, 4.16, 3.94, 4.08, 4.03),
    _row("LLaMA 3 Instruct 8B", 4.38, 3.88, 4.33, 4.08, 4.17, 4.10),
    _row("LLaMA 3 Instruct 70B", 4.55, 4.26, 4.59, 4.42, 4.45, 4.39),
    _row("Janus 7B", 4.43, 4.06, 4.41, 4.11, 4.01, 4.17),
    _row("Janus+ORPO 7B", 4.41, 4.03, 4.45, 4.00, 4.22, 4.18),
    _row("Janus+DPO 7B", 4.45, 4.13, 4.43, 4.21, 4.17, 4.24),
    _row("GPT-3.5 Turbo-0125", 4.05, 3.86, 4.15, 3.87, 3.85, 3.91),
    _row("GPT-4-0613", 4.25, 4.00, 4.18, 4.16, 4.13, 4.10),
    _row("GPT-4-Turbo-0125", 4.45, 4.27, 4.61, 4.45, 4.27, 4.35),
)
# the picture keeps to the rows a user most often compares against (the table shows all of them)
PICTURE_ROWS = ("Mistral 7B Instruct v0.2", "GPT-3.5 Turbo-0125", "GPT-4-0613", "Janus 7B", "Janus+ORPO 7B",
                "Janus+DPO 7B")


def picture_rows(rows: tuple[PublishedRow, ...] | list[PublishedRow]) -> list[PublishedRow]:
    return [row for row in rows if row.model in PICTURE_ROWS]


def comparability_notes(items: int, judge_model: str, runs: int) -> list[str]:
    """Why this run's scores are not measured as the published ones, if they are not."""
    notes = []
    if items != PUBLISHED_ITEMS:
        notes.append(f"this run scored {items} items, the published figures all {PUBLISHED_ITEMS}")
    if judge_model != JUDGE_MODEL:
        notes.append(f"this run's judge is {judge_model}, the paper's {JUDGE_MODEL}")
    if runs != 3:
        notes.append(f"this run averages {runs} judge run(s), the paper 3")
    return notes
