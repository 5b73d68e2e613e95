"""The published Multifaceted Bench (`kaist-ai/Multifaceted-Bench`, 921 items) as a bench to evaluate on.

`--bench kaist-ai/Multifaceted-Bench` reads it through `datasets.load_dataset` (the hub, or its cache);
`--bench PATH` reads a local copy in its published layout: a folder as the hub holds it (`data/*.parquet`,
or `*.jsonl` / `*.json` files), a `save_to_disk` folder, or one data file. Every row is an item, in the
published order; nothing is left out or drawn, so a run covers exactly the published items.

Columns: `source, preference_set, system, prompt, reference_answer, rubrics` (the older `rubric` is
taken too; `preference_set` is not needed to evaluate). An item's id is its prompt's instruction id; a
prompt that appears again under another system message gets the id of system message and prompt.
The bench's version is a hash of its rows, so the hub and a local copy of the same data share their
stored responses and judgments.

Benchmarks from `source`: the four fixed labels in any of their usual spellings (`alpaca-eval`,
`AlpacaEval`, `mt_bench`, `MT-Bench`, `self-instruct`, `koala`...), every other label a FLASK task
(`Alpha-nlg (art)`). FLASK's own tasks named `Koala` and `Self-instruct` stay FLASK's, as in our own bench.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

from facets.schemas import Rubric, instruction_id
from facets.schemas.evaluation import BENCHMARKS

PUBLISHED_BENCH = "kaist-ai/Multifaceted-Bench"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# spellings of the four fixed benchmarks' labels; exact, so FLASK's `Koala` / `Self-instruct` tasks stay FLASK's
_SPELLINGS = {
    "alpaca_eval": ("alpaca-eval", "alpaca_eval", "alpacaeval", "AlpacaEval", "AlpacaEval 2.0", "alpaca_eval_2"),
    "koala": ("koala", "koala_test_set"),
    "mt_bench": ("mt-bench", "mt_bench", "mtbench", "MT-Bench", "MT-bench"),
    "self_instruct": ("self-instruct", "self_instruct", "selfinstruct", "user_oriented_instructions"),
}
LABEL_TO_BENCHMARK = {label: name for name, labels in _SPELLINGS.items() for label in labels}
DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".csv")


class PublishedBenchError(ValueError):
    pass


def published_benchmark_of(source: str) -> str:
    return LABEL_TO_BENCHMARK.get(source.strip(), "flask")


def is_hub_id(path: str) -> bool:
    """An `owner/name` that is not a local path."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def is_published_layout(path: str) -> bool:
    """A hub id, or a local copy in the published layout (not a bench release of ours, which has `bench/`)."""
    if is_hub_id(path):
        return True
    folder = Path(path)
    if folder.is_file():
        return folder.suffix in DATA_SUFFIXES
    if not folder.is_dir() or (folder / "bench").is_dir() or (folder / "releases").is_dir():
        return False
    return (folder / "data").is_dir() or (folder / "state.json").is_file() or any(
        p.suffix in (".jsonl", ".json") and p.name not in ("manifest.json", "dataset_info.json") for p in folder.iterdir())


def read_rows(path: str) -> list[dict]:
    """The `train` split's rows, through `datasets` (hub id, hub-layout folder, save_to_disk folder or file)."""
    import datasets

    try:
        if Path(path, "state.json").is_file():
            loaded = datasets.load_from_disk(path)
            dataset = loaded["train"] if isinstance(loaded, datasets.DatasetDict) else loaded
        elif Path(path).is_file():
            kind = {".jsonl": "json", ".json": "json"}.get(Path(path).suffix, Path(path).suffix.lstrip("."))
            dataset = datasets.load_dataset(kind, data_files=path, split="train")
        else:
            dataset = datasets.load_dataset(path, split="train")
    except Exception as exc:  # noqa: BLE001 - the hub, the cache and the file readers raise their own kinds
        where = "the hub (or its cache)" if is_hub_id(path) else path
        raise PublishedBenchError(f"could not read the bench from {where}: {type(exc).__name__}: {exc}") from None
    return list(dataset)


def _rubrics(row: dict, index: int) -> tuple[Rubric, ...]:
    raw = row.get("rubrics", row.get("rubric"))
    if isinstance(raw, str):
        raw = json.loads(raw)
    if not isinstance(raw, list) or len(raw) != 4:
        raise PublishedBenchError(f"row {index}: `rubrics` must hold 4 rubrics (criteria, score_descriptions 1-5)")
    return tuple(Rubric.model_validate({"criteria": r["criteria"], "score_descriptions": r["score_descriptions"]})
                 for r in raw)


def rows_version(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        rubrics = row.get("rubrics", row.get("rubric"))
        digest.update(json.dumps([row.get("source"), row.get("system"), row.get("prompt"), row.get("reference_answer"),
                                  rubrics], sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    return f"published-{digest.hexdigest()[:12]}"


def items_of(rows: list[dict]) -> list:
    """Bench items of the published rows, in their order (see the module docstring for the ids)."""
    from facets.evaluation.bench_release import BenchItem

    items, seen = [], set()
    for index, row in enumerate(rows):
        missing = [c for c in ("source", "system", "prompt", "reference_answer") if not isinstance(row.get(c), str)]
        if missing:
            raise PublishedBenchError(f"row {index} lacks {', '.join(missing)}: not the Multifaceted-Bench layout "
                                      "(source, preference_set, system, prompt, reference_answer, rubrics)")
        item_id = instruction_id(row["prompt"])
        if item_id in seen:
            item_id = instruction_id(f"{row['system']}\n{row['prompt']}")
        if item_id in seen:
            item_id = f"{item_id}-{index}"
        seen.add(item_id)
        items.append(BenchItem(item_id, published_benchmark_of(row["source"]), row["source"], row["system"],
                               row["prompt"], row["reference_answer"], _rubrics(row, index)))
    return items


def load_published_bench(path: str):
    from facets.evaluation.bench_release import Bench

    rows = read_rows(path)
    if not rows:
        raise PublishedBenchError(f"{path}: the bench has no rows")
    return Bench(rows_version(rows), path, tuple(items_of(rows)), published=True)


def benchmark_counts(bench) -> dict[str, int]:
    """Items per benchmark, every benchmark named (0 where it has none)."""
    counts = Counter(item.benchmark for item in bench.items)
    return {name: counts.get(name, 0) for name in BENCHMARKS}


def target_counts(path: str) -> dict[str, int]:
    """Items per benchmark of a bench (the published one, or any), for drawing a bench of one's own."""
    from facets.evaluation.bench_release import load_bench

    return benchmark_counts(load_bench(path))
