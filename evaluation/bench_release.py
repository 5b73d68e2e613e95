"""The Multifaceted Bench as a release: contamination check, rows, `releases/<version>/bench/`, loading.

A bench release is a version folder of its own, beside the training releases: `bench/` (one Parquet
file in the published Multifaceted-Bench layout, split `train`), `README.md` and `manifest.json`. Its
version is a hash of the bench file, so building the same bench again makes nothing new.
`releases/LATEST_BENCH` names the newest bench; `releases/LATEST` stays the training release's.

Contamination: a bench prompt whose normalised text (case-folded) is also a training prompt, in the
`instructions` stage or in the `sft` set of any release of the data dirs checked, is reported and left
out before any call is paid for it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.dataset as ds
import pyarrow.parquet as pq

from facets.schemas import BenchRow, Rubric, arrow_schema, instruction_id, normalise_text, to_table
from facets.schemas.evaluation import BENCHMARKS
from facets.storage import Store
from facets.storage.scratch import open_scratch, sweep
from facets.evaluation.sources import BenchPrompt, benchmark_of
from facets.release.publish import file_sha256

BENCH = "bench"
LATEST_BENCH = "LATEST_BENCH"
MANIFEST = "manifest.json"
BENCH_FILE = f"{BENCH}/train-00000-of-00001.parquet"


class BenchError(ValueError):
    pass


# -- contamination -------------------------------------------------------------------------------------
def contamination_key(text: str) -> str:
    return normalise_text(text).casefold()


def training_prompts(store: Store) -> set[str]:
    """Contamination keys of every training prompt of a data dir: the instructions stage and every
    release's `sft` set (a release published elsewhere and copied in counts too)."""
    keys: set[str] = set()
    files = store.files("instructions")
    if files:
        table = ds.dataset(files, format="parquet", filesystem=store.fs).to_table(columns=["text"])
        keys.update(contamination_key(t) for t in table.column("text").to_pylist())
    releases = store.path("releases")
    if store.fs.exists(releases):
        for version_dir in store.fs.ls(releases, detail=False):
            sft = f"{version_dir.rstrip('/')}/sft"
            for path in store.parquet_files(sft):
                table = pq.read_table(path, columns=["prompt"], filesystem=store.fs)
                keys.update(contamination_key(t) for t in table.column("prompt").to_pylist())
    return keys


def split_contaminated(prompts: list[BenchPrompt], training: set[str]) -> tuple[list[BenchPrompt], list[BenchPrompt]]:
    kept, removed = [], []
    for prompt in prompts:
        (removed if contamination_key(prompt.text) in training else kept).append(prompt)
    return kept, removed


# -- publishing ----------------------------------------------------------------------------------------
@dataclass
class BenchRelease:
    version: str
    path: str          # the release folder
    rows: int
    is_new: bool


def _card(version: str, counts: dict[str, int], manifest: dict) -> str:
    lines = [
        "---", "configs:", "- config_name: default", "  data_files:", "  - split: train", f"    path: {BENCH_FILE}", "---",
        f"# Multifaceted Bench {version}", "",
        "Benchmark prompts, each with a synthetic multifaceted system message, a reference answer written "
        "under it, the preference set it was written from and one rubric per preference (criteria and score "
        "descriptions 1-5). Columns: `source, preference_set, system, prompt, reference_answer, rubrics`, "
        "as the published `kaist-ai/Multifaceted-Bench`.", "",
        "| benchmark | items |", "|---|---|",
        *[f"| {BENCHMARKS[name]} | {n} |" for name, n in counts.items()],
        f"| total | {sum(counts.values())} |", "",
        f"Left out as training prompts (contamination): {len(manifest.get('contaminated', []))}. "
        f"Left out by failed stages: {sum(manifest.get('left_out', {}).values())}.", "",
        "Models: " + ", ".join(f"{k} `{v}`" for k, v in manifest.get("models", {}).items()), "",
    ]
    return "\n".join(lines)


def publish_bench(store: Store, rows: list[BenchRow], extra: dict | None = None) -> BenchRelease:
    """Write the bench release (see the module docstring); returns what it did."""
    if not store.is_local:
        raise BenchError("bench releases are written to a local data dir (copy it to object storage after)")
    if not rows:
        raise BenchError("nothing to publish: no bench item has all its rows")
    rows = sorted(rows, key=lambda r: instruction_id(r.prompt))
    sweep(store)  # what killed publishers left
    scratch = open_scratch(store, "bench")  # locked while this process works in it (storage/scratch.py)
    staging = scratch.path
    try:
        os.makedirs(f"{staging}/{BENCH}")
        pq.write_table(to_table(rows, BenchRow), f"{staging}/{BENCH_FILE}", compression="zstd")
        content = file_sha256(f"{staging}/{BENCH_FILE}")
        version = f"bench-{content[:12]}"
        target = store.path("releases", version)
        counts = {name: 0 for name in BENCHMARKS}
        for row in rows:
            counts[benchmark_of(row.source)] += 1
        is_new = not os.path.exists(f"{target}/{MANIFEST}")
        if is_new:
            if os.path.exists(target):
                raise BenchError(f"{target} exists without {MANIFEST}; remove it and publish again")
            manifest = {
                "version": version, "kind": "bench", "content_hash": content,
                "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "counts": {"items": len(rows), **counts},
                "files": {BENCH_FILE: {"sha256": content, "bytes": os.path.getsize(f"{staging}/{BENCH_FILE}"), "rows": len(rows)}},
                **(extra or {}),
            }
            with open(f"{staging}/README.md", "w", encoding="utf-8") as handle:
                handle.write(_card(version, counts, manifest))
            with open(f"{staging}/{MANIFEST}", "w", encoding="utf-8") as handle:
                json.dump(manifest, handle, indent=2, default=str)
                handle.write("\n")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            try:
                os.rename(staging, target)
            except OSError:
                if not os.path.exists(f"{target}/{MANIFEST}"):
                    raise
                is_new = False
    finally:
        scratch.close()
        try:
            os.rmdir(store.path(".staging"))
        except OSError:
            pass
    store.write_text(f"{version}\n", "releases", LATEST_BENCH)
    return BenchRelease(version, target, len(rows), is_new)


# -- loading -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchItem:
    item_id: str
    benchmark: str
    source: str
    system: str
    prompt: str
    reference_answer: str
    rubrics: tuple[Rubric, ...]


@dataclass(frozen=True)
class Bench:
    version: str
    path: str
    items: tuple[BenchItem, ...]
    published: bool = False   # the published Multifaceted-Bench (evaluation/published_bench.py)

    def first(self, limit: int | None) -> list[BenchItem]:
        return list(self.items if limit is None else self.items[:limit])


def resolve_bench(path: str) -> tuple[str, str]:
    """(bench folder, version) from a bench folder, a release folder, or a data dir with LATEST_BENCH."""
    path = path.rstrip("/")
    latest = os.path.join(path, "releases", LATEST_BENCH)
    if os.path.isfile(latest):
        with open(latest) as handle:
            path = os.path.join(path, "releases", handle.read().strip())
    if os.path.isdir(os.path.join(path, BENCH)):
        path = os.path.join(path, BENCH)
    if not os.path.isdir(path) or not any(n.endswith(".parquet") for n in os.listdir(path)):
        raise BenchError(f"{path} holds no bench: pass a bench folder, its release folder, or a data dir "
                         f"where `facets bench build` published one")
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    if parent.startswith("bench-"):
        return path, parent
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith(".parquet"):
            digest.update(file_sha256(os.path.join(path, name)).encode())
    return path, f"bench-{digest.hexdigest()[:12]}"


def load_bench(path: str) -> Bench:
    """The bench items, validated against the published layout, in the file's order: a bench of ours (its
    folder, release folder or data dir), or the published bench (a hub id or a copy in its layout)."""
    from facets.evaluation.published_bench import is_published_layout, load_published_bench

    if is_published_layout(path):
        return load_published_bench(path)
    folder, version = resolve_bench(path)
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".parquet"))
    table = ds.dataset(files, format="parquet", schema=arrow_schema(BenchRow)).to_table()
    items, seen = [], set()
    for raw in table.to_pylist():
        row = BenchRow.model_validate(raw)
        item_id = instruction_id(row.prompt)
        if item_id in seen:
            raise BenchError(f"{folder}: the prompt of item {item_id} appears twice")
        seen.add(item_id)
        items.append(BenchItem(item_id, benchmark_of(row.source), row.source, row.system, row.prompt,
                               row.reference_answer, tuple(row.rubrics)))
    return Bench(version, folder, tuple(items))
