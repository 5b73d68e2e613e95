"""Training subsets with 1, 2 or 3 system messages per instruction: the paper's ablation, from one release.

`sft-k` keeps k of each instruction's rows of the release's `sft` set: the row `small` chose first (so `sft-1`
is `small`'s rows), then the others in an order seeded by `seed`; the subsets nest (sft-1 in sft-2 in
sft-3 = sft). Each is written as a release-like folder `<out>/sft-k/` whose `sft/` holds the rows in the
published layout, with a README and a manifest naming the release it came from, so
`facets train --release <out>/sft-2` trains on it as on any release. The release itself is never touched
(docs/ARCHITECTURE.md, principle 7); the default `<out>` is `<data dir>/subsets/<version>/`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from facets.schemas import SFTRow, arrow_schema

COUNTS = (1, 2, 3)
DATA_FILE = "sft/train-00000-of-00001.parquet"


class SubsetError(ValueError):
    pass


@dataclass(frozen=True)
class Subset:
    per_instruction: int
    path: str
    rows: int
    instructions: int
    short: int   # instructions with fewer rows than asked for


def default_out(release: Path) -> Path:
    """`<data dir>/subsets/<version>/` beside `<data dir>/releases/<version>/`."""
    return release.parent.parent / "subsets" / release.name


def _parquet_glob(release: Path, subset: str) -> str:
    files = sorted((release / subset).glob("*.parquet"))
    if not files:
        raise SubsetError(f"{release} has no {subset}/ Parquet files: pass a release folder written by `facets build`")
    return "[" + ", ".join("'" + str(f).replace("'", "''") + "'" for f in files) + "]"


def _ranked(con: duckdb.DuckDBPyConnection, release: Path, seed: int) -> None:
    """`ranked`: the sft rows with their rank within the instruction (small's row first, then seeded)."""
    con.execute(f"""
        CREATE TEMP VIEW ranked AS
        WITH small AS (SELECT DISTINCT prompt, system FROM read_parquet({_parquet_glob(release, 'small')}))
        SELECT s.*, row_number() OVER (
                   PARTITION BY s.prompt
                   ORDER BY (sm.system IS NULL), md5('{int(seed)}:' || s.system), s.system) AS rank
        FROM read_parquet({_parquet_glob(release, 'sft')}) s
        LEFT JOIN small sm ON sm.prompt = s.prompt AND sm.system = s.system
    """)


def write_subsets(release: str | os.PathLike[str], out: str | os.PathLike[str] | None = None,
                  counts: tuple[int, ...] = COUNTS, seed: int = 0) -> list[Subset]:
    """Write `sft-k` for each k of `counts` (see the module docstring); what was written."""
    release = Path(release)
    if any(k not in COUNTS for k in counts):
        raise SubsetError(f"system messages per instruction are 1, 2 or 3, not {sorted(set(counts) - set(COUNTS))}")
    target = Path(out) if out is not None else default_out(release)
    schema = arrow_schema(SFTRow)
    columns = ", ".join(schema.names)
    con = duckdb.connect()
    written = []
    try:
        _ranked(con, release, seed)
        instructions = con.execute("SELECT count(DISTINCT prompt) FROM ranked").fetchall()[0][0]
        for k in counts:
            folder = target / f"sft-{k}"
            (folder / "sft").mkdir(parents=True, exist_ok=True)
            table = con.sql(f"SELECT {columns} FROM ranked WHERE rank <= {k} ORDER BY prompt, rank").to_arrow_table()
            temporary = folder / f"{DATA_FILE}.tmp"
            pq.write_table(table.cast(schema), temporary, compression="zstd")
            os.replace(temporary, folder / DATA_FILE)
            short = con.execute(f"SELECT count(*) FROM (SELECT prompt FROM ranked GROUP BY prompt HAVING count(*) < {k})"
                            ).fetchall()[0][0]
            subset = Subset(k, str(folder), table.num_rows, instructions, short)
            _describe(folder, release, subset, seed)
            written.append(subset)
    finally:
        con.close()
    return written


def _describe(folder: Path, release: Path, subset: Subset, seed: int) -> None:
    manifest = {"kind": "subset", "from_release": release.name, "from_path": str(release.resolve()),
                "system_messages_per_instruction": subset.per_instruction, "seed": seed, "rows": subset.rows,
                "instructions": subset.instructions, "instructions_with_fewer": subset.short,
                "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: sft\n  data_files:\n  - split: train\n    path: " + DATA_FILE + "\n---\n"
        f"# {release.name}, {subset.per_instruction} system message(s) per instruction\n\n"
        f"{subset.rows} rows of {subset.instructions} instructions from release `{release.name}`'s `sft` set: "
        f"the row `small` chose first, then the others in an order seeded by {seed}. "
        f"Train with `facets train --release {folder}`.\n")
