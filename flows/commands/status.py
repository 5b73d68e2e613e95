"""`facets status`: per stage, the instructions done and missing, and failures by reason."""
from __future__ import annotations

import argparse

from facets.storage.stages import STAGE_MODELS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="data directory (default ./data)")


def run(args: argparse.Namespace) -> int:
    from facets.storage import Store

    with Store(args.data_dir).catalog() as catalog:
        total = catalog.sql("select count(distinct id) from instructions").fetchall()[0][0]
        print(f"{args.data_dir}: {total} instructions")
        print(f"{'stage':<18}{'rows':>10}{'done':>10}{'missing':>10}")
        for stage in STAGE_MODELS:
            if stage == "instructions":
                continue
            rows, done = catalog.sql(f"select count(*), count(distinct instruction_id) from {stage}").fetchall()[0]
            print(f"{stage:<18}{rows:>10}{done:>10}{total - done:>10}")
        failures = catalog.sql("select stage, reason, count(*) from failures group by 1, 2 order by 3 desc").fetchall()
        for stage, reason, count in failures:
            print(f"failed  {stage}:{reason} x{count}")
        latest = catalog.store.read_text("releases", "LATEST")
        print(f"latest release: {latest.strip() if latest else 'none'}")
    return 0
