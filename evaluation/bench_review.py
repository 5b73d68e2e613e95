"""Human review of a bench: export its items for reading, then publish only the accepted ones.

The paper's bench was validated by people; this is that step for a bench of one's own. `review_lines`
writes one JSON object per item (its id first, then what a reviewer reads). A reviewer returns an accept
list: one item id a line (`#` comments and blank lines ignored), or the review lines themselves with
`"accepted": true` / `false` added. `accept` publishes the accepted items as a new bench release (its
manifest names the bench it came from and how many were left out); the reviewed bench stays as it was.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from facets.schemas import BenchRow, instruction_id
from facets.storage import Store
from facets.evaluation.bench_release import BenchError, BenchRelease, load_bench, publish_bench, resolve_bench


def review_lines(bench_path: str) -> list[str]:
    """One JSON line per item: id, benchmark, source, system message, prompt, reference answer, rubrics."""
    bench = load_bench(bench_path)
    return [json.dumps({"item_id": item.item_id, "benchmark": item.benchmark, "source": item.source,
                        "system": item.system, "prompt": item.prompt, "reference_answer": item.reference_answer,
                        "rubrics": [r.model_dump(by_alias=True) for r in item.rubrics]}, ensure_ascii=False)
            for item in bench.items]


def read_accept_list(path: str | Path) -> set[str]:
    """Accepted item ids: plain id lines, or JSON lines with `item_id` (and `accepted`, true unless false)."""
    accepted: set[str] = set()
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BenchError(f"{path}:{number}: not a JSON line ({exc})") from None
            if "item_id" not in record:
                raise BenchError(f"{path}:{number}: a JSON line needs `item_id`")
            if record.get("accepted", True) is not False:
                accepted.add(str(record["item_id"]))
        else:
            accepted.add(line)
    return accepted


def _rows(bench_path: str) -> list[BenchRow]:
    import pyarrow.dataset as ds

    from facets.schemas import arrow_schema

    folder, _ = resolve_bench(bench_path)
    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    table = ds.dataset(files, format="parquet", schema=arrow_schema(BenchRow)).to_table()
    return [BenchRow.model_validate(raw) for raw in table.to_pylist()]


def accept(store: Store, bench_path: str, accept_list: str | Path) -> tuple[BenchRelease, int]:
    """Publish the accepted items of a bench of ours as a new bench release; (release, items left out)."""
    bench = load_bench(bench_path)
    if bench.published:
        raise BenchError("the published bench was reviewed by its authors; review a bench built here")
    accepted = read_accept_list(accept_list)
    known = {item.item_id for item in bench.items}
    unknown = sorted(accepted - known)
    if unknown:
        raise BenchError(f"{len(unknown)} accepted ids are not items of {bench.version}, e.g. {unknown[:3]}")
    if not accepted:
        raise BenchError(f"{accept_list} accepts no item")
    rows = [row for row in _rows(bench_path) if instruction_id(row.prompt) in accepted]
    digest = hashlib.sha256(Path(accept_list).read_bytes()).hexdigest()
    release = publish_bench(store, rows, {"reviewed_from": bench.version, "accept_list_sha256": digest,
                                          "accepted": len(rows), "not_accepted": len(known) - len(rows)})
    return release, len(known) - len(rows)
