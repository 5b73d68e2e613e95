"""The five benchmarks the Multifaceted Bench draws its prompts from, read from their own files.

| name | file (as published) | prompt | `source` label |
|---|---|---|---|
| alpaca_eval | `model_outputs.json` (JSON array; AlpacaEval 2.0 set) | `instruction` | `alpaca-eval` |
| flask | `flask_evaluation.jsonl` | `instruction` (input inlined) | the row's `task`, e.g. `Alpha-nlg (art)` |
| koala | `koala_test_set.jsonl` | `prompt` | `koala` |
| mt_bench | `question.jsonl` | `turns[0]` (first turn only) | `mt-bench` |
| self_instruct | `user_oriented_instructions.jsonl` | `instruction`, plus `"\\n\\n" + input` when given | `self-instruct` |

`source` is the finest label a benchmark gives (docs/ARCHITECTURE.md, decision 11). The benchmarks share prompts
(AlpacaEval holds all of Self-Instruct and most of Koala; FLASK holds Koala's), so a prompt found in
several is kept once, by the most specific benchmark: self_instruct, koala, mt_bench, flask, then
alpaca_eval. Prompts are compared loosely for that (normalised, case-folded, FLASK's `Input:` joins
ignored). A PATH may be the file itself or a folder holding it under its published name.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facets.schemas import Instruction, normalise_text
from facets.schemas.evaluation import BENCHMARKS
from facets.tasks.plan import seeded_rank

FILES = {
    "alpaca_eval": "model_outputs.json",
    "flask": "flask_evaluation.jsonl",
    "koala": "koala_test_set.jsonl",
    "mt_bench": "question.jsonl",
    "self_instruct": "user_oriented_instructions.jsonl",
}
LABELS = {"alpaca_eval": "alpaca-eval", "koala": "koala", "mt_bench": "mt-bench", "self_instruct": "self-instruct"}
PRIORITY = ("self_instruct", "koala", "mt_bench", "flask", "alpaca_eval")
_INPUT_JOIN = re.compile(r"\binput:\s*")


class BenchSourceError(ValueError):
    pass


@dataclass(frozen=True)
class BenchPrompt:
    benchmark: str   # a key of BENCHMARKS
    source: str      # the bench row's `source`
    text: str
    original_id: str

    @property
    def instruction(self) -> Instruction:
        """The prompt as an instruction of the build's stages, its source named after its benchmark."""
        return Instruction.from_text(self.text, main_source=self.benchmark, original_source=self.source)

    @property
    def id(self) -> str:
        return self.instruction.id


@dataclass
class LoadReport:
    read: Counter = field(default_factory=Counter)            # benchmark -> prompts read
    empty: Counter = field(default_factory=Counter)           # benchmark -> rows without a prompt
    duplicates: Counter = field(default_factory=Counter)      # benchmark -> prompts given up to another
    drawn: Counter = field(default_factory=Counter)           # benchmark -> prompts kept


def benchmark_of(source: str) -> str:
    """The benchmark of a bench row from its `source`: the four fixed labels, else FLASK (a task label)."""
    for name, label in LABELS.items():
        if source == label:
            return name
    return "flask"


def loose_key(text: str) -> str:
    """How two benchmarks' copies of a prompt are recognised as one."""
    return _INPUT_JOIN.sub("", normalise_text(text).casefold())


def parse_source(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    name = name.strip()
    if not sep or not path.strip():
        raise BenchSourceError(f"a bench source is NAME=PATH, got {spec!r}")
    if name not in BENCHMARKS:
        raise BenchSourceError(f"unknown bench source {name!r}; known: {', '.join(BENCHMARKS)}")
    file = Path(path.strip())
    if file.is_dir():
        file = file / FILES[name]
    if not file.is_file():
        raise BenchSourceError(f"{name}: {file} is not a file")
    return name, file


def _records(path: Path) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise BenchSourceError(f"{path}: a JSON array of records was expected")
            return data
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise BenchSourceError(f"{path}: not valid JSON ({exc})") from None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _alpaca_eval(row: dict) -> tuple[str, str, str]:
    return _text(row.get("instruction")), LABELS["alpaca_eval"], f"{row.get('dataset', '')}"


def _flask(row: dict) -> tuple[str, str, str]:
    return _text(row.get("instruction")), _text(row.get("task")) or "flask", str(row.get("idx", ""))


def _koala(row: dict) -> tuple[str, str, str]:
    return _text(row.get("prompt")), LABELS["koala"], str(row.get("id", ""))


def _mt_bench(row: dict) -> tuple[str, str, str]:
    turns = row.get("turns") or []
    return _text(turns[0] if turns else ""), LABELS["mt_bench"], str(row.get("question_id", ""))


def _self_instruct(row: dict) -> tuple[str, str, str]:
    instances = row.get("instances") or [{}]
    given = _text(instances[0].get("input")) if isinstance(instances[0], dict) else ""
    text = _text(row.get("instruction"))
    return (f"{text}\n\n{given}" if given else text), LABELS["self_instruct"], str(row.get("id", ""))


READERS = {"alpaca_eval": _alpaca_eval, "flask": _flask, "koala": _koala, "mt_bench": _mt_bench,
           "self_instruct": _self_instruct}


def read_benchmark(name: str, path: Path, report: LoadReport | None = None) -> list[BenchPrompt]:
    prompts = []
    for index, row in enumerate(_records(path)):
        if not isinstance(row, dict):
            raise BenchSourceError(f"{path}: record {index} is not an object")
        text, source, original = READERS[name](row)
        if not text:
            if report is not None:
                report.empty[name] += 1
            continue
        prompts.append(BenchPrompt(name, source, text, original or str(index)))
    if report is not None:
        report.read[name] += len(prompts)
    return prompts


def load_bench_prompts(specs: list[str], per_benchmark: int | dict[str, int] | None = None, seed: int = 0
                       ) -> tuple[list[BenchPrompt], LoadReport]:
    """Prompts of the named sources, each kept once (see the module docstring); `per_benchmark` draws that
    many of each benchmark in a seeded order (one count for all, or a count per benchmark, as the published
    bench's: a benchmark it does not name is drawn whole). Sorted by instruction id."""
    report = LoadReport()
    by_name: dict[str, list[BenchPrompt]] = {}
    for spec in specs:
        name, path = parse_source(spec)
        by_name.setdefault(name, []).extend(read_benchmark(name, path, report))
    seen: set[str] = set()
    kept: dict[str, list[BenchPrompt]] = {}
    for name in PRIORITY:
        for prompt in by_name.get(name, []):
            key = loose_key(prompt.text)
            if key in seen:
                report.duplicates[name] += 1
                continue
            seen.add(key)
            kept.setdefault(name, []).append(prompt)
    out: list[BenchPrompt] = []
    for name, prompts in kept.items():
        count = per_benchmark.get(name) if isinstance(per_benchmark, dict) else per_benchmark
        if count is not None:
            prompts = sorted(prompts, key=lambda p: (seeded_rank(p.id, seed), p.id))[:count]
        report.drawn[name] += len(prompts)
        out.extend(prompts)
    return sorted(out, key=lambda p: p.id), report
