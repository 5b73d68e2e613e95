"""The release publisher: layouts loaded through `datasets`, selection of the build's rows, content-addressed
versions, card, pictures, manifest and the hub push failing clearly offline.

Stage tables are built from real published examples (Janus README records) with rows of an earlier build,
rows written twice by a retried shard and one incomplete instruction.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from facets.schemas import (
    DIMENSIONS,
    GoldResponse,
    Instruction,
    Pair,
    Preference,
    PreferencePairRow,
    PreferenceSet,
    RMRow,
    SFTRow,
    SystemMessage,
    fingerprint,
)
from facets.storage import Catalog, Store
from facets.release.publish import (
    EXPECTED_SCHEMA,
    Release,
    ReleaseError,
    ReleaseInfo,
    ReleasePushError,
    publish_release,
    push_release,
    rm_test_size,
)

PUBLISHED = Path(__file__).parent / "data" / "published"
SUBSET_COLUMNS = {
    "sft": ["main_source", "original_source", "preference_set", "system", "prompt", "output"],
    "small": ["main_source", "original_source", "preference_set", "system", "prompt", "output"],
    "dpo": ["main_source", "original_source", "system", "prompt", "chosen", "rejected"],
    "orpo": ["main_source", "original_source", "system", "prompt", "chosen", "rejected"],
    "rm": ["input", "chosen", "rejected"],
}
ROW_MODELS = {"sft": SFTRow, "small": SFTRow, "dpo": PreferencePairRow, "orpo": PreferencePairRow, "rm": RMRow}
T0 = datetime(2024, 6, 1, tzinfo=timezone.utc)
N = 4  # complete instructions


# -- a small build from real published examples ---------------------------------------------------------
def _published() -> tuple[list[tuple[str, str, str]], list[dict]]:
    """(instruction, system, output) triples from the Janus README examples, and the 468 preference set."""
    rec = json.loads((PUBLISHED / "janus_readme_5529fba_multifaceted_bench_example_468.json").read_text())["468"]
    col = json.loads((PUBLISHED / "janus_readme_5529fba_multifaceted_collection_example.json").read_text())
    flask = json.loads((PUBLISHED / "janus_readme_b6df510_multifaceted_bench_example.json").read_text())
    triples = [
        (rec["user_prompt"], rec["system_prompt"], rec["reference_answer"]),
        (col["instruction"], col["system"], col["output"]),
        (flask["prompt"], flask["system"], flask["reference_answer"]),
    ]
    return triples, rec["preference"]


class Build:
    """Stage rows of one build: N complete instructions and one whose set 2 has no response."""

    def __init__(self, store: Store, version: str = "a"):
        self.store = store
        triples, prefs = _published()
        texts = [t[0] for t in triples] + ["Write a haiku about the first frost of autumn.",
                                            "Explain the difference between a list and a tuple in Python."]
        sources = [("Nectar", "sharegpt"), ("OpenHermesPreferences", "airoboros2.2"),
                   ("domain_specific_preference", "dsp"), ("Nectar", "lmsys-chat-1m"),
                   ("ultrafeedback_binarized_cleaned", "evol_instruct")]
        self.instructions = [Instruction.from_text(t, *s) for t, s in zip(texts, sources)]
        self.complete = [i.id for i in self.instructions[:N]]
        self.incomplete = self.instructions[N].id
        self.version = version
        self.sets: dict[tuple[str, int], list[Preference]] = {}
        self.systems: dict[tuple[str, int], str] = {}
        self.outputs: dict[tuple[str, int], str] = {}
        self.pairs: dict[str, tuple[int, int]] = {}
        for n, ins in enumerate(self.instructions):
            for k in range(3):
                chosen = [dict(p) for p in prefs]
                for p in chosen:
                    p["subdimension"] = ["clarity", "depth", "tone"][k] if p["dimension"] == "style" else p["subdimension"]
                    p["preference"] = f"{p['preference']} ({k})" if k else p["preference"]
                self.sets[ins.id, k] = [Preference(**p) for p in chosen]
                _, system, output = triples[(n + k) % 3]
                self.systems[ins.id, k] = f"{system} (instruction {n}, set {k})"
                self.outputs[ins.id, k] = f"{output}\n\n(instruction {n}, set {k}, build {version})"
            self.pairs[ins.id] = ((n % 3), (n + 1) % 3)

    def fp(self, stage: str, iid: str) -> str:
        # a changed build version re-keys responses and pairs only (like a changed response template)
        version = self.version if stage in ("responses", "pairs") else "a"
        return fingerprint(stage, iid, version)

    def write(self, *, stale: bool = True, duplicates: bool = True) -> None:
        s = self.store
        s.write("instructions", self.instructions)
        s.write("preference_sets", [PreferenceSet(instruction_id=i, fingerprint=self.fp("preference_sets", i), set_index=k,
                                                  preferences=p, created_at=T0) for (i, k), p in self.sets.items()])
        s.write("system_messages", [SystemMessage(instruction_id=i, fingerprint=self.fp("system_messages", i), set_index=k,
                                                  text=t, model="sys-model", prompt_version="system_message@1",
                                                  created_at=T0) for (i, k), t in self.systems.items()])
        responses = [GoldResponse(instruction_id=i, fingerprint=self.fp("responses", i), set_index=k, text=t,
                                  model="gold-model", prompt_version="gold_response@1", created_at=T0)
                     for (i, k), t in self.outputs.items() if (i, k) != (self.incomplete, 2)]
        s.write("responses", responses)
        s.write("pairs", [Pair(instruction_id=i, fingerprint=self.fp("pairs", i), chosen_index=c, rejected_index=r,
                               created_at=T0) for i, (c, r) in self.pairs.items()])
        if duplicates:  # a retried shard wrote the first two instructions' responses and pairs again
            again = [r.model_copy(update={"created_at": T0 + timedelta(hours=1)}) for r in responses
                     if r.instruction_id in self.complete[:2]]
            s.write("responses", again, label="retry")
            s.write("pairs", [Pair(instruction_id=i, fingerprint=self.fp("pairs", i), chosen_index=c, rejected_index=r,
                                   created_at=T0 + timedelta(hours=1)) for i, (c, r) in self.pairs.items()
                              if i in self.complete[:2]], label="retry")
        if stale:  # an earlier build: other fingerprints, other texts, other pair choices
            old = lambda stage, i: fingerprint(stage, i, "earlier-build")  # noqa: E731
            s.write("system_messages", [SystemMessage(instruction_id=i, fingerprint=old("system_messages", i), set_index=k,
                                                      text=f"STALE system {k}", model="old", prompt_version="system_message@0",
                                                      created_at=T0 + timedelta(days=1)) for (i, k) in self.systems])
            s.write("responses", [GoldResponse(instruction_id=i, fingerprint=old("responses", i), set_index=k,
                                               text=f"STALE output {k}", model="old", prompt_version="gold_response@0",
                                               created_at=T0 + timedelta(days=1)) for (i, k) in self.outputs])
            s.write("pairs", [Pair(instruction_id=i, fingerprint=old("pairs", i), chosen_index=2, rejected_index=1,
                                   created_at=T0 + timedelta(days=1)) for i in self.pairs])

    def expected(self) -> pa.Table:
        rows = []
        for ins in self.instructions:
            for stage in ("preference_sets", "system_messages", "responses"):
                rows += [{"stage": stage, "instruction_id": ins.id, "set_index": k, "fingerprint": self.fp(stage, ins.id)}
                         for k in range(3)]
            rows.append({"stage": "pairs", "instruction_id": ins.id, "set_index": -1, "fingerprint": self.fp("pairs", ins.id)})
        return pa.Table.from_pylist(rows, schema=EXPECTED_SCHEMA)


INFO = ReleaseInfo(
    models={"preference_trees": "tree-model", "system_messages": "sys-model", "responses": "gold-model"},
    prompt_versions={"preference_trees": "preference_tree@abc", "system_messages": "system_message@1",
                     "responses": "gold_response@1"},
    usage={
        "preference_trees": {"requests": 5, "prompt_tokens": 1000, "completion_tokens": 2000, "cost_usd": 0.25, "rate_limited": 1},
        "system_messages": {"requests": 15, "prompt_tokens": 3000, "completion_tokens": 4000, "cost_usd": None, "rate_limited": 0},
        "responses": {"requests": 15, "prompt_tokens": 5000, "completion_tokens": 6000, "cost_usd": 0.5, "rate_limited": 2},
    },
    build_seconds=12.5,
    seed=7,
    config={"limit": 5, "endpoint": {"base_url": "http://127.0.0.1:1/v1", "api_key": "sk-do-not-print"}},
)


def _load(path: str, cache: Path):
    import datasets

    return datasets.load_dataset("parquet", data_dir=path, cache_dir=str(cache))


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    store = Store(root)
    build = Build(store)
    build.write()
    release = publish_release(store, build.expected(), INFO, seed=3)
    return store, build, release


# -- tests ----------------------------------------------------------------------------------------------
def test_rm_test_size():
    assert rm_test_size(65_000, 0.005) == 325
    assert rm_test_size(4, 0.005) == 1       # a tiny build still has a test split
    assert rm_test_size(2, 0.5) == 1
    assert rm_test_size(10, 0.99) == 9       # never everything
    assert rm_test_size(1, 0.005) == 0       # one pair: train only
    assert rm_test_size(100, 0) == 0
    with pytest.raises(ValueError):
        rm_test_size(10, 1.0)


def test_counts_and_layout(published):
    store, build, release = published
    assert isinstance(release, Release) and release.is_new and release.latest_changed
    assert release.counts == {"instructions": N, "sft": 3 * N, "small": N, "dpo": N, "orpo": N,
                              "rm_train": N - 1, "rm_test": 1, "left_out": 1}
    assert release.left_out == {"response missing": 1}
    root = Path(release.path)
    assert root == Path(store.root) / "releases" / release.version
    assert (root.parent / "LATEST").read_text().strip() == release.version
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert names == ["README.md", "dpo/train-00000-of-00001.parquet", "manifest.json", "orpo/train-00000-of-00001.parquet",
                     "report/README.md", "report/lengths.png", "report/report.json", "report/rouge_l.png",
                     "report/subdimensions.png", "rm/test-00000-of-00001.parquet", "rm/train-00000-of-00001.parquet",
                     "sft/train-00000-of-00001.parquet", "small/train-00000-of-00001.parquet",
                     "sunburst.html", "sunburst.png"]
    assert not any(p.name.startswith(".") for p in Path(store.root).joinpath("releases").iterdir())


def test_every_subset_loads_with_datasets(published, tmp_path):
    import datasets

    _, _, release = published
    pref_item = {k: datasets.Value("string") for k in ("dimension", "subdimension", "preference", "description")}
    chat_item = {"content": datasets.Value("string"), "role": datasets.Value("string")}
    for subset, columns in SUBSET_COLUMNS.items():
        loaded = _load(f"{release.path}/{subset}", tmp_path)
        assert sorted(loaded) == (["test", "train"] if subset == "rm" else ["train"]), subset
        for split, ds in loaded.items():
            assert ds.column_names == columns, subset
            features = ds.features
            if "preference_set" in columns:
                item = features["preference_set"].feature
                assert list(item) == list(pref_item) and dict(item) == pref_item
            if subset in ("dpo", "orpo"):
                for side in ("chosen", "rejected"):
                    item = features[side].feature
                    assert list(item) == ["content", "role"] and dict(item) == chat_item
            else:
                assert all(features[c] == datasets.Value("string") for c in columns if c != "preference_set")
            for row in ds:
                ROW_MODELS[subset].model_validate(row)
    assert sum(len(ds) for ds in _load(f"{release.path}/rm", tmp_path).values()) == N


def _rows(release: Release, subset: str, split: str = "train") -> list[dict]:
    return pq.read_table(f"{release.path}/{subset}/{split}-00000-of-00001.parquet").to_pylist()


def test_rows_are_the_builds_rows_in_order(published):
    _, build, release = published
    by_prompt = {i.text: i for i in build.instructions}
    order = sorted(build.complete)
    sft = _rows(release, "sft")
    assert [(by_prompt[r["prompt"]].id, r["system"]) for r in sft] == [(i, build.systems[i, k]) for i in order for k in range(3)]
    for row in sft:
        ins = by_prompt[row["prompt"]]
        k = [k for k in range(3) if build.systems[ins.id, k] == row["system"]][0]
        assert row["output"] == build.outputs[ins.id, k]
        assert row["preference_set"] == [p.model_dump() for p in build.sets[ins.id, k]]
        assert [p["dimension"] for p in row["preference_set"]] == list(DIMENSIONS)
        assert (row["main_source"], row["original_source"]) == (ins.main_source, ins.original_source)
    everything = json.dumps([_rows(release, s) for s in ("sft", "small", "dpo", "orpo")]
                            + [_rows(release, "rm", sp) for sp in ("train", "test")])
    assert "STALE" not in everything
    assert build.instructions[N].text not in everything  # the incomplete instruction is left out

    small = _rows(release, "small")
    dpo = _rows(release, "dpo")
    assert _rows(release, "orpo") == dpo
    assert [r["prompt"] for r in small] == [r["prompt"] for r in dpo] == [by_prompt_id(build, i) for i in order]
    for s, d, iid in zip(small, dpo, order):
        chosen, rejected = build.pairs[iid]
        assert chosen != rejected
        assert s["system"] == d["system"] == build.systems[iid, chosen]
        assert s["output"] == build.outputs[iid, chosen]
        assert d["chosen"] == [{"content": d["prompt"], "role": "user"}, {"content": build.outputs[iid, chosen], "role": "assistant"}]
        assert d["rejected"] == [{"content": d["prompt"], "role": "user"}, {"content": build.outputs[iid, rejected], "role": "assistant"}]
    rm = {r["input"]: r for sp in ("train", "test") for r in _rows(release, "rm", sp)}
    assert len(rm) == N
    for d in dpo:
        r = rm[d["system"] + "\n" + d["prompt"]]
        assert (r["chosen"], r["rejected"]) == (d["chosen"][1]["content"], d["rejected"][1]["content"])


def by_prompt_id(build: Build, iid: str) -> str:
    return next(i.text for i in build.instructions if i.id == iid)


def test_manifest_hashes_match_files(published):
    _, _, release = published
    root = Path(release.path)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["version"] == release.version
    listed = set(manifest["files"])
    assert listed == {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
    for name, entry in manifest["files"].items():
        data = (root / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"], name
        if name.endswith(".parquet"):
            assert pq.ParquetFile(root / name).metadata.num_rows == entry["rows"]
    assert manifest["counts"] == release.counts
    assert manifest["models"] == INFO.models and manifest["prompt_versions"] == INFO.prompt_versions
    assert manifest["tokens"] == {"prompt_tokens": 9000, "completion_tokens": 12000}
    assert manifest["cost_usd"] is None and manifest["cost"] == "unknown"
    assert "sk-do-not-print" not in (root / "manifest.json").read_text()


def test_card(published):
    _, _, release = published
    text = (Path(release.path) / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    configs = {c["config_name"]: c["data_files"] for c in meta["configs"]}
    assert list(configs) == ["sft", "small", "dpo", "orpo", "rm"]
    assert configs["rm"] == [{"split": "train", "path": "rm/train-*.parquet"}, {"split": "test", "path": "rm/test-*.parquet"}]
    assert configs["sft"] == [{"split": "train", "path": "sft/train-*.parquet"}]
    usage_rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert usage_rows["system_messages"].rstrip(" |").endswith("unknown")       # cost None -> unknown
    assert usage_rows["preference_trees"].rstrip(" |").endswith("$0.2500")
    assert usage_rows["**total**"].rstrip(" |").endswith("unknown")            # never 0 or a partial sum
    assert "$0.0000" not in text
    for fact in ("tree-model", "system_message@1", "gold_response@1", "12.5 s", "9,000", "12,000",
                 "response missing", "sunburst.html", "sunburst.png", "Nectar", "OpenHermesPreferences"):
        assert fact in text, fact
    assert "sk-do-not-print" not in text
    # the data report is on the card, its pictures beside it in report/
    report = text.split("## Data report", 1)[1].split("\n## ", 1)[0]
    assert "### Pairwise ROUGE-L" in report and "| descriptions: style |" in report
    for picture in re.findall(r"!\[[^]]*\]\((report/[^)]+)\)", report):
        assert (Path(release.path) / picture).is_file(), picture
    # the stage table counts the ignored rows of the earlier build and the retried shard
    assert re.search(r"\| responses \| 15 \| 14 \| 15 \| 6 \|", text), text


def test_sunburst_html_is_offline_and_png_valid(published):
    _, _, release = published
    root = Path(release.path)
    html = (root / "sunburst.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", html, re.IGNORECASE)
    assert len(html) > 1_000_000 and "Plotly.newPlot" in html  # plotly.js itself is inline
    assert '"type":"sunburst"' in html.replace(" ", "")
    assert "Style" in html and "Background knowledge" in html and "clarity" in html
    png = (root / "sunburst.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    image = matplotlib.image.imread(str(root / "sunburst.png"))
    assert image.shape[0] > 500 and image.shape[1] > 500


def test_catalog_sees_the_release(published):
    store, _, release = published
    with Catalog(store) as catalog:
        assert catalog.sql("SELECT count(*) FROM release_sft").fetchall() == [(3 * N,)]
        assert catalog.sql("SELECT count(*) FROM release_rm").fetchall() == [(N,)]


def test_identical_republish_makes_no_new_release(published):
    store, build, release = published
    latest = Path(store.root) / "releases" / "LATEST"
    before = (latest.read_text(), latest.stat().st_mtime_ns, sorted(os.listdir(latest.parent)))
    card = (Path(release.path) / "README.md").read_bytes()
    build.write(stale=False, duplicates=False)  # the whole build written again: every row duplicated
    again = publish_release(store, build.expected(), INFO.model_copy(update={"build_seconds": 99.0}), seed=3)
    assert again.version == release.version and not again.is_new and not again.latest_changed
    assert again.counts == release.counts
    assert (latest.read_text(), latest.stat().st_mtime_ns, sorted(os.listdir(latest.parent))) == before
    assert (Path(release.path) / "README.md").read_bytes() == card
    assert not (Path(store.root) / ".staging").exists()  # no work in progress left behind


def test_changed_content_makes_a_new_version(tmp_path, published):
    _, _, first = published
    store = Store(tmp_path / "data")
    old = Build(store, version="a")
    old.write()
    v1 = publish_release(store, old.expected(), INFO, seed=3)
    assert v1.version == first.version  # the version is a function of content, not of time or place
    new = Build(store, version="b")   # new responses (new fingerprints) for every instruction
    new.write(stale=False, duplicates=False)
    v2 = publish_release(store, new.expected(), INFO, seed=3)
    assert v2.is_new and v2.version != v1.version
    assert (Path(store.root) / "releases" / "LATEST").read_text().strip() == v2.version
    assert all("build b" in r["output"] for r in _rows(v2, "sft"))
    assert all("build a" in r["output"] for r in _rows(v1, "sft"))  # the old release is untouched
    # publishing content equal to an older release points LATEST back at it without a new folder
    back = publish_release(store, old.expected(), INFO, seed=3)
    assert back.version == v1.version and not back.is_new and back.latest_changed
    assert (Path(store.root) / "releases" / "LATEST").read_text().strip() == v1.version


def test_nothing_complete_is_an_error(tmp_path):
    store = Store(tmp_path / "data")
    build = Build(store)
    build.write()
    expected = build.expected().filter(pa.compute.equal(build.expected().column("instruction_id"), build.incomplete))
    with pytest.raises(ReleaseError, match="nothing to publish.*response missing"):
        publish_release(store, expected, INFO)
    bad = build.expected().set_column(0, "stage", pa.array(["trees"] * build.expected().num_rows))
    with pytest.raises(ReleaseError, match="unknown stages"):
        publish_release(store, bad, INFO)
    assert not (Path(store.root) / "releases").exists()


def test_push_release_fails_offline_with_one_line(published, monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    _, _, release = published
    # no network: the hub endpoint is a closed port on loopback
    for module, name in ((datasets.config, "HF_ENDPOINT"), (huggingface_hub.constants, "ENDPOINT")):
        monkeypatch.setattr(module, name, "http://127.0.0.1:9")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(ReleasePushError) as failure:
        push_release(release.path, "someone/multifaceted", token="hf_not_a_token")
    message = str(failure.value)
    assert "\n" not in message and "someone/multifaceted" in message and "sft" in message
    with pytest.raises(ReleasePushError, match="not a release"):
        push_release(tmp_path, "someone/multifaceted")


def test_a_row_written_later_makes_a_new_version(tmp_path):
    """Same build (same expected rows), but the missing response arrives: the instruction joins the release."""
    store = Store(tmp_path / "data")
    build = Build(store)
    build.write(stale=False, duplicates=False)
    first = publish_release(store, build.expected(), INFO, seed=3)
    assert first.counts["instructions"] == N and first.left_out == {"response missing": 1}
    store.write("responses", [GoldResponse(instruction_id=build.incomplete, fingerprint=build.fp("responses", build.incomplete),
                                           set_index=2, text=build.outputs[build.incomplete, 2], model="gold-model",
                                           prompt_version="gold_response@1", created_at=T0)])
    second = publish_release(store, build.expected(), INFO, seed=3)
    assert second.is_new and second.version != first.version
    assert second.counts["instructions"] == N + 1 and second.counts["sft"] == 3 * (N + 1) and second.left_out == {}


def test_object_store_gives_the_same_release(published):
    """Through fsspec (an in-memory store stands in for S3): the same bytes, so the same version."""
    _, _, local = published
    store = Store(f"memory://release-test-{os.getpid()}/data")
    try:
        build = Build(store)
        build.write()
        release = publish_release(store, build.expected(), INFO, seed=3)
        assert release.version == local.version and release.path.startswith("memory://")
        base = store.path("releases", release.version)
        manifest = json.loads(store.fs.cat_file(f"{base}/manifest.json"))
        for name, entry in manifest["files"].items():
            assert hashlib.sha256(store.fs.cat_file(f"{base}/{name}")).hexdigest() == entry["sha256"], name
        assert store.fs.cat_file(store.path("releases", "LATEST")).decode().strip() == release.version
        again = publish_release(store, build.expected(), INFO, seed=3)
        assert not again.is_new and again.version == release.version
    finally:
        store.fs.rm(store.root, recursive=True)


def test_a_release_that_does_not_fit_duckdbs_memory_is_made_again_with_more(tmp_path, published, caplog):
    import duckdb

    _, _, first = published
    store = Store(tmp_path / "data")
    build = Build(store)
    build.write()
    with pytest.raises(duckdb.OutOfMemoryException):  # 1, 2, 4 and 8 MB: too little for DuckDB itself
        publish_release(store, build.expected(), INFO, seed=3, memory_mb=1)
    assert not (Path(store.root) / "releases").exists()
    with caplog.at_level("WARNING", logger="facets.release.publish"):
        release = publish_release(store, build.expected(), INFO, seed=3, memory_mb=5)
    assert release.version == first.version and release.is_new
    assert "making it again with 10 MB" in caplog.text
