"""A release's data report: the paper's diversity and coverage analyses, as numbers, plots and Markdown.

- **Preference descriptions**: pairwise ROUGE-L between descriptions of the same dimension (the paper's
  diversity figure): pairs of distinct descriptions drawn at random, seeded, up to `max_pairs` per dimension.
- **System messages of an instruction**: ROUGE-L of each pair among an instruction's system messages (three
  pairs for three), on up to `max_instructions` instructions drawn at random, seeded.
- **Subdimension coverage**: per dimension, the distinct subdimensions (case and spacing folded), the share
  the ten most frequent cover, and the top ones with their counts.
- **Lengths**: words of instructions, system messages, gold responses and descriptions (min, median, p90, max).

`write_report` puts `report/README.md`, `report/report.json` and the PNGs beside a release's datasets
(`releases/<version>/report/`; the datasets and their manifest stay as published).
"""
from __future__ import annotations

import io
import json
import random
import statistics
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import duckdb

from facets.schemas import DIMENSIONS
from facets.release.markdown import markdown_table
from facets.release.rouge import rouge_l, tokens

REPORT_DIR = "report"
TOP = 10


@dataclass
class Distribution:
    count: int
    mean: float
    median: float
    p10: float
    p90: float
    minimum: float
    maximum: float

    @classmethod
    def of(cls, values: list[float]) -> "Distribution":
        if not values:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ordered = sorted(values)

        def at(q: float) -> float:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

        return cls(len(values), round(statistics.fmean(values), 4), round(statistics.median(values), 4),
                   round(at(0.1), 4), round(at(0.9), 4), round(ordered[0], 4), round(ordered[-1], 4))


@dataclass
class Coverage:
    distinct: int
    items: int
    top_share: float                                  # share of items in the TOP most frequent subdimensions
    top: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class DataReport:
    release: str
    rows: int
    instructions: int
    seed: int
    description_rouge: dict[str, Distribution]       # dimension -> pairwise ROUGE-L
    system_rouge: Distribution                        # pairs among an instruction's system messages
    coverage: dict[str, Coverage]                     # dimension -> subdimensions
    lengths: dict[str, Distribution]                  # words of prompt, system, output, description
    samples: dict[str, list[float]] = field(default_factory=dict, repr=False)   # for the plots

    def as_json(self) -> dict:
        data = asdict(self)
        data.pop("samples")
        return data


def _sft(release: Path) -> str:
    files = sorted((release / "sft").glob("*.parquet"))
    if not files:
        raise ValueError(f"{release} has no sft/ Parquet files: pass a release folder written by `facets build`")
    return "read_parquet([" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "])"


def _pairs(n: int, limit: int, rng: random.Random) -> list[tuple[int, int]]:
    """Up to `limit` distinct index pairs of n items: all of them when few, else drawn at random."""
    total = n * (n - 1) // 2
    if total <= limit:
        return list(combinations(range(n), 2))
    chosen: set[tuple[int, int]] = set()
    while len(chosen) < limit:
        i, j = rng.sample(range(n), 2)
        chosen.add((min(i, j), max(i, j)))
    return sorted(chosen)


def _description_rouge(con: duckdb.DuckDBPyConnection, source: str, max_pairs: int, rng: random.Random
                       ) -> dict[str, list[float]]:
    out = {}
    for dimension in DIMENSIONS:
        texts = [row[0] for row in con.execute(
            f"SELECT DISTINCT p.description FROM (SELECT unnest(preference_set) AS p FROM {source}) "
            "WHERE p.dimension = ? ORDER BY 1", [dimension]).fetchall()]
        token_lists = [tokens(t) for t in texts]
        out[dimension] = [rouge_l(token_lists[i], token_lists[j]) for i, j in _pairs(len(texts), max_pairs, rng)]
    return out


def _system_rouge(con: duckdb.DuckDBPyConnection, source: str, max_instructions: int, rng: random.Random) -> list[float]:
    groups = [row[0] for row in con.execute(
        f"SELECT list(system ORDER BY system) FROM {source} GROUP BY prompt HAVING count(*) > 1 ORDER BY prompt").fetchall()]
    if len(groups) > max_instructions:
        groups = rng.sample(groups, max_instructions)
    scores = []
    for systems in groups:
        token_lists = [tokens(s) for s in systems]
        scores.extend(rouge_l(a, b) for a, b in combinations(token_lists, 2))
    return scores


def _coverage(con: duckdb.DuckDBPyConnection, source: str) -> dict[str, Coverage]:
    rows = con.execute(f"""
        WITH items AS (SELECT p.dimension AS dimension,
                              lower(regexp_replace(trim(p.subdimension), '\\s+', ' ', 'g')) AS sub
                       FROM (SELECT unnest(preference_set) AS p FROM {source}))
        SELECT dimension, sub, count(*) AS n FROM items GROUP BY ALL ORDER BY dimension, n DESC, sub
    """).fetchall()
    out = {}
    for dimension in DIMENSIONS:
        counts = [(sub, n) for d, sub, n in rows if d == dimension]
        items = sum(n for _, n in counts)
        top = counts[:TOP]
        out[dimension] = Coverage(len(counts), items, round(sum(n for _, n in top) / items, 4) if items else 0.0, top)
    return out


def _lengths(con: duckdb.DuckDBPyConnection, source: str) -> dict[str, list[float]]:
    def words(query: str) -> list[float]:
        return [float(len(tokens(row[0]))) for row in con.execute(query).fetchall()]

    return {
        "prompt": words(f"SELECT DISTINCT prompt FROM {source}"),
        "system": words(f"SELECT system FROM {source}"),
        "output": words(f"SELECT output FROM {source}"),
        "description": words(f"SELECT p.description FROM (SELECT unnest(preference_set) AS p FROM {source})"),
    }


def data_report(release: str | Path, seed: int = 0, max_pairs: int = 2000, max_instructions: int = 1000) -> DataReport:
    """The analyses of the module docstring over a release's `sft` set (seeded samples)."""
    release = Path(release)
    source = _sft(release)
    rng = random.Random(seed)
    con = duckdb.connect()
    try:
        rows, instructions = con.execute(f"SELECT count(*), count(DISTINCT prompt) FROM {source}").fetchall()[0]
        descriptions = _description_rouge(con, source, max_pairs, rng)
        systems = _system_rouge(con, source, max_instructions, rng)
        coverage = _coverage(con, source)
        lengths = _lengths(con, source)
    finally:
        con.close()
    samples = {**{f"description:{d}": v for d, v in descriptions.items()}, "system": systems,
               **{f"length:{k}": v for k, v in lengths.items()}}
    return DataReport(release.name, rows, instructions, seed,
                      {d: Distribution.of(v) for d, v in descriptions.items()}, Distribution.of(systems), coverage,
                      {k: Distribution.of(v) for k, v in lengths.items()}, samples)


# -- pictures ------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def rouge_png(report: DataReport) -> bytes:
    """ROUGE-L histograms: descriptions within each dimension, and an instruction's system messages."""
    figure = _figure(12, 6)
    panels = [(f"description:{d}", d.replace("_", " ")) for d in DIMENSIONS] + [("system", "system messages of an instruction")]
    bins = [k / 20 for k in range(21)]
    for index, (key, title) in enumerate(panels):
        axes = figure.add_subplot(2, 3, index + 1)
        values = report.samples.get(key, [])
        axes.hist(values, bins=bins, color="#4C78A8" if key != "system" else "#F58518")
        mean = statistics.fmean(values) if values else 0.0
        axes.axvline(mean, color="black", linewidth=0.8, linestyle="--")
        axes.set_title(f"{title}\nmean {mean:.3f}, {len(values)} pairs", fontsize=9)
        axes.set_xlim(0, 1)
        axes.set_xlabel("ROUGE-L", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.suptitle(f"Pairwise ROUGE-L, release {report.release}", fontsize=11)
    return _png(figure)


def coverage_png(report: DataReport) -> bytes:
    """The most frequent subdimensions of each dimension, as a share of that dimension's preferences."""
    figure = _figure(12, 7)
    for index, dimension in enumerate(DIMENSIONS):
        axes = figure.add_subplot(2, 2, index + 1)
        cover = report.coverage[dimension]
        labels = [sub for sub, _ in cover.top][::-1]
        shares = [100.0 * n / cover.items for _, n in cover.top][::-1] if cover.items else []
        axes.barh(labels, shares, color="#54A24B")
        axes.set_title(f"{dimension.replace('_', ' ')}: {cover.distinct} subdimensions, top {TOP} "
                       f"cover {100 * cover.top_share:.0f}%", fontsize=9)
        axes.set_xlabel("% of preferences", fontsize=8)
        axes.tick_params(labelsize=7)
    return _png(figure)


def lengths_png(report: DataReport) -> bytes:
    figure = _figure(12, 6)
    for index, name in enumerate(("prompt", "system", "output", "description")):
        axes = figure.add_subplot(2, 2, index + 1)
        values = report.samples.get(f"length:{name}", [])
        axes.hist(values, bins=40, color="#B279A2")
        axes.set_title(f"{name}: median {statistics.median(values) if values else 0:.0f} words", fontsize=9)
        axes.set_xlabel("words", fontsize=8)
        axes.tick_params(labelsize=7)
    return _png(figure)


# -- Markdown and files --------------------------------------------------------------------------------
def _dist_row(name: str, d: Distribution) -> tuple:
    return name, d.count, f"{d.mean:.3f}", f"{d.median:.3f}", f"{d.p10:.3f}", f"{d.p90:.3f}"


def report_markdown(report: DataReport, pictures: bool = True, folder: str = "") -> str:
    """The report as markdown; `folder`: where its pictures are, seen from where the markdown is read."""
    rouge = [*(_dist_row(f"descriptions: {d}", report.description_rouge[d]) for d in DIMENSIONS),
             _dist_row("system messages of one instruction", report.system_rouge)]
    coverage = [(d, c.distinct, f"{100 * c.top_share:.1f}%", ", ".join(f"{sub} ({n})" for sub, n in c.top[:5]))
                for d, c in ((d, report.coverage[d]) for d in DIMENSIONS)]
    lengths = [(name, d.count, f"{d.mean:.1f}", f"{d.median:.0f}", f"{d.p10:.0f}", f"{d.p90:.0f}", f"{d.maximum:.0f}")
               for name, d in report.lengths.items()]
    lines = [f"# Data report: release {report.release}", "",
             f"{report.rows} SFT rows, {report.instructions} instructions; samples seeded with {report.seed}.", "",
             "## Pairwise ROUGE-L (lower is more diverse)", "",
             markdown_table(["pairs of", "pairs", "mean", "median", "p10", "p90"], rouge), ""]
    if pictures:
        lines += [f"![ROUGE-L]({folder}rouge_l.png)", ""]
    lines += ["## Subdimension coverage", "",
              markdown_table(["dimension", "subdimensions", f"top {TOP} cover", "most frequent"], coverage), ""]
    if pictures:
        lines += [f"![Subdimensions]({folder}subdimensions.png)", ""]
    lines += ["## Lengths (words)", "",
              markdown_table(["text", "count", "mean", "median", "p10", "p90", "max"], lengths)]
    if pictures:
        lines += ["", f"![Lengths]({folder}lengths.png)"]
    return "\n".join(lines) + "\n"


def write_report(release: str | Path, report: DataReport) -> dict[str, str]:
    """`report/README.md`, `report.json` and the PNGs in the release folder; their paths."""
    folder = Path(release) / REPORT_DIR
    folder.mkdir(exist_ok=True)
    files = {"markdown": folder / "README.md", "json": folder / "report.json", "rouge_png": folder / "rouge_l.png",
             "coverage_png": folder / "subdimensions.png", "lengths_png": folder / "lengths.png"}
    files["markdown"].write_text(report_markdown(report), encoding="utf-8")
    files["json"].write_text(json.dumps(report.as_json(), indent=2) + "\n", encoding="utf-8")
    files["rouge_png"].write_bytes(rouge_png(report))
    files["coverage_png"].write_bytes(coverage_png(report))
    files["lengths_png"].write_bytes(lengths_png(report))
    return {name: str(path) for name, path in files.items()}


def report_files(release: Path, seed: int, max_pairs: int, max_instructions: int) -> dict:
    """The report written into `<release>/report/`: its files, its markdown and its ROUGE-L rows (for a table)."""
    report = data_report(release, seed=seed, max_pairs=max_pairs, max_instructions=max_instructions)
    return {"files": write_report(release, report), "markdown": report_markdown(report, pictures=False),
            "rouge": [{"pairs of": f"descriptions: {d}", **vars(dist)} for d, dist in report.description_rouge.items()]
                     + [{"pairs of": "system messages of one instruction", **vars(report.system_rouge)}]}
