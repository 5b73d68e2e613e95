"""The data report of a release (ROUGE-L, coverage, lengths, plots), `facets report`, and the subsets with
1/2/3 system messages per instruction, on a release folder in the published layout written here."""
from __future__ import annotations

import json
import random
from itertools import combinations
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from facets.schemas import DIMENSIONS, SFTRow, to_table
from facets.release.data_report import data_report, report_markdown, write_report
from facets.release.rouge import lcs_length, rouge_l, tokens
from facets.release.subsets import write_subsets

PUBLISHED = Path(__file__).parent / "data" / "published"
SUBS = {"style": ["clarity", "Clarity ", "tone", "format"], "background_knowledge": ["novice", "expert", "novice", "basic"],
        "informativeness": ["depth", "creativity", "depth", "relevance"], "harmlessness": ["safety", "accuracy", "morality", "safety"]}


def _rows(instructions: int = 6) -> list[SFTRow]:
    base = json.loads((PUBLISHED / "janus_readme_5529fba_multifaceted_bench_example_468.json").read_text())["468"]
    rows = []
    for i in range(instructions):
        for k in range(3):
            preferences = [{**p, "subdimension": SUBS[p["dimension"]][(i + k) % 4],
                            "description": f"{p['description']} variant {i} {k}"} for p in base["preference"]]
            rows.append(SFTRow(main_source="nectar", original_source="sharegpt", preference_set=preferences,
                               system=f"You are assistant {k} for task {i}. " + base["system_prompt"][: 200 + 40 * k],
                               prompt=f"Task {i}: {base['user_prompt']}", output=f"Answer {k}. {base['reference_answer'][:300]}"))
    return rows


@pytest.fixture
def release(tmp_path) -> Path:
    folder = tmp_path / "data" / "releases" / "0123abcd"
    rows = _rows()
    for subset, chosen in (("sft", rows), ("small", [r for n, r in enumerate(rows) if n % 3 == 1])):
        (folder / subset).mkdir(parents=True)
        pq.write_table(to_table(chosen, SFTRow), folder / subset / "train-00000-of-00001.parquet")
    (folder.parent / "LATEST").write_text("0123abcd\n")
    return folder


def _dp_lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bit_parallel_lcs_equals_the_textbook_table():
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.choice("abcdef") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcdef") for _ in range(rng.randint(0, 70))]
        assert lcs_length(a, b) == _dp_lcs(a, b)
    # ROUGE-L F1 by hand: LCS "the cat the mat" = 4 of 6 and 4 of 5 tokens
    assert rouge_l("The cat sat on the mat", "the cat and the mat") == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert rouge_l("same words", "Same, words!") == 1.0 and rouge_l("", "x") == 0.0


def test_the_report_measures_what_the_release_holds(release):
    report = data_report(release, seed=1)
    rows = _rows()
    assert (report.rows, report.instructions) == (18, 6)
    # every pair of distinct style descriptions is compared (few enough), with ROUGE-L as computed by hand
    style = sorted({p.description for r in rows for p in r.preference_set if p.dimension == "style"})
    expected = [rouge_l(a, b) for a, b in combinations(style, 2)]
    assert report.description_rouge["style"].count == len(expected)
    assert report.description_rouge["style"].mean == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    # the system messages of each instruction: 3 pairs each
    assert report.system_rouge.count == 6 * 3
    first = sorted(r.system for r in rows[:3])
    assert min(rouge_l(a, b) for a, b in combinations(first, 2)) >= report.system_rouge.minimum - 1e-4
    # subdimensions folded by case and spacing: "Clarity " is "clarity"
    style_cover = report.coverage["style"]
    assert style_cover.distinct == 3 and style_cover.items == 18 and dict(style_cover.top)["clarity"] == 9
    assert report.lengths["prompt"].count == 6 and report.lengths["system"].count == 18
    assert report.lengths["output"].median == pytest.approx(len(tokens(rows[0].output)), abs=3)
    # seeded: the same report again; few pairs kept when asked
    assert data_report(release, seed=1).as_json() == report.as_json()
    assert data_report(release, seed=1, max_pairs=5, max_instructions=2).description_rouge["style"].count == 5
    assert data_report(release, seed=1, max_instructions=2).system_rouge.count == 6


def test_the_report_is_written_into_the_release_with_plots(release):
    report = data_report(release)
    files = write_report(release, report)
    assert {Path(p).parent for p in files.values()} == {release / "report"}
    for name in ("rouge_png", "coverage_png", "lengths_png"):
        assert Path(files[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = Path(files["markdown"]).read_text()
    assert "descriptions: style" in text and "system messages of one instruction" in text and "![ROUGE-L](rouge_l.png)" in text
    assert json.loads(Path(files["json"]).read_text())["instructions"] == 6
    assert "![" not in report_markdown(report, pictures=False)
    assert set(report.coverage) == set(DIMENSIONS)


def test_subsets_nest_start_from_small_and_load_as_releases(release, tmp_path):
    import datasets

    from facets.training.data import check_layout, subset_files

    written = write_subsets(release, seed=2)
    assert [s.rows for s in written] == [6, 12, 18] and all(s.short == 0 for s in written)
    assert Path(written[0].path) == tmp_path / "data" / "subsets" / "0123abcd" / "sft-1"
    keys = []
    for subset in written:
        table = pq.read_table(Path(subset.path) / "sft" / "train-00000-of-00001.parquet")
        keys.append({(r["prompt"], r["system"]) for r in table.to_pylist()})
        files = subset_files(Path(subset.path), "sft")
        assert check_layout(files, "sft") == subset.rows
        loaded = datasets.load_dataset("parquet", data_dir=str(Path(subset.path) / "sft"), cache_dir=str(tmp_path / "c"))
        assert loaded["train"].num_rows == subset.rows and len(loaded["train"][0]["preference_set"]) == 4
    small = {(r["prompt"], r["system"]) for r in pq.read_table(release / "small").to_pylist()}
    assert keys[0] == small and keys[0] < keys[1] < keys[2]
    assert json.loads((Path(written[1].path) / "manifest.json").read_text())["from_release"] == "0123abcd"
    assert sorted(p.name for p in release.iterdir()) == ["sft", "small"], "the release is not touched"


def test_facets_report_writes_the_report_and_subsets(release, tmp_path, capsys):
    from facets.flows.cli import main

    code = main(["report", str(tmp_path / "data"), "--no-artifacts", "--subsets", "1,3", "--subsets-out", str(tmp_path / "sub")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (release / "report" / "README.md").is_file() and "Pairwise ROUGE-L" in out
    assert (tmp_path / "sub" / "sft-1").is_dir() and (tmp_path / "sub" / "sft-3").is_dir()
    assert not (tmp_path / "sub" / "sft-2").exists()
    assert main(["report", str(tmp_path / "nowhere"), "--no-artifacts"]) == 2
    assert main(["report", str(tmp_path / "data"), "--no-artifacts", "--subsets", "4"]) == 2


@pytest.mark.slow
def test_facets_report_publishes_artifacts(release, tmp_path, prefect_server):
    import asyncio

    from prefect.client.orchestration import get_client

    from facets.flows.cli import main

    assert main(["report", str(release)]) == 0

    async def keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    assert {"data-report", "data-report-rouge"} <= asyncio.run(keys())


def test_the_sunburst_png_gives_each_dimension_its_top_subdimensions(tmp_path):
    """A long tail of rare subdimensions (as real builds have) must not leave the picture unlabelled."""
    import duckdb
    import pyarrow as pa

    from facets.release.sunburst import OTHER, _panel_subdimensions, sunburst_nodes, sunburst_png

    rng = random.Random(0)
    rows = []
    for i in range(400):
        rows.append({"preference_set": [
            {"dimension": d, "subdimension": SUBS[d][i % 4] if i % 2 else f"rare {d} {rng.randint(0, 300)}",
             "preference": f"p{i % 5}", "description": "x"} for d in DIMENSIONS]})
    con = duckdb.connect()
    con.register("sets", pa.Table.from_pylist(rows))
    nodes = sunburst_nodes(con, "sets")
    children: dict = {}
    for node in nodes:
        children.setdefault(node.parent, []).append(node)
    style = next(n for n in children[""] if n.dimension == "style")
    panel = _panel_subdimensions(style, children, top=3)
    # odd rows carry "Clarity " and "format" (200 each); even rows 200 rare ones, one or two apiece
    assert {n.label for n, _ in panel[:2]} == {"Clarity ", "format"} and panel[-1][0] is None
    assert sum(count for _, count in panel) == style.value == 400
    assert all(n.label != OTHER for n, _ in panel[:-1])
    assert sunburst_png(nodes, "t")[:8] == b"\x89PNG\r\n\x1a\n"
