"""Markdown tables, as the release card, the data report and the build report write them."""
from __future__ import annotations

from collections.abc import Sequence


def cell(value: object) -> str:
    """One cell on one line: a `|` or `\\` in the text stays text."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").strip() or " "


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows])
