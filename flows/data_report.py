"""The `data-report` flow: a release's data report (release/data_report.py) as files in the release folder and
as Prefect artifacts."""
from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

from facets.release.data_report import report_files


@flow(name="data-report", log_prints=True, persist_result=False)
async def data_report(release: str, seed: int = 0, max_pairs: int = 2000, max_instructions: int = 1000) -> dict:
    """Pairwise ROUGE-L, subdimension coverage and lengths of a release, with plots."""
    done = report_files(Path(release), seed, max_pairs, max_instructions)
    await acreate_markdown_artifact(done["markdown"], key="data-report", description=f"data report of {Path(release).name}")
    await acreate_table_artifact(done["rouge"], key="data-report-rouge", description="pairwise ROUGE-L")
    return done
