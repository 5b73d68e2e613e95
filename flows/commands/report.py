"""`facets report [RELEASE]`: a release's data report, and the paper's subsets of 1/2/3 system messages.

The report (release/data_report.py): pairwise ROUGE-L among preference descriptions within each dimension
and among the system messages of an instruction, subdimension coverage, and length distributions, with
plots. It is written to `<release>/report/` and published as Prefect artifacts (`data-report`,
`data-report-rouge`) by the `data-report` flow (flows/data_report.py), run in this process on Prefect's
embedded server.

`--subsets 1,2,3` also writes training subsets with that many system messages per instruction
(release/subsets.py) to `<data dir>/subsets/<version>/sft-k/`, each trainable with `facets train --release`.

RELEASE is a release folder, or a data dir (or its releases/ folder) whose LATEST names one (default ./data).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add = parser.add_argument
    add("release", nargs="?", default="data", help="a release folder, or a data dir whose releases/LATEST names one")
    add("--seed", type=int, default=0, help="seed of the sampled pairs and instructions (default 0)")
    add("--max-pairs", type=int, default=2000, help="description pairs per dimension at most (default 2000)")
    add("--max-instructions", type=int, default=1000,
        help="instructions whose system messages are compared, at most (default 1000)")
    add("--subsets", help="also write training subsets with these numbers of system messages per instruction, e.g. 1,2,3")
    add("--subsets-out", type=Path, help="where the subsets go (default <data dir>/subsets/<version>/)")
    add("--no-artifacts", dest="artifacts", action="store_false",
        help="write the files only (no Prefect flow run, no artifacts)")


def resolve_release(path: str) -> Path:
    root = Path(path)
    for pointer in (root / "LATEST", root / "releases" / "LATEST"):
        if pointer.is_file():
            return pointer.parent / pointer.read_text().strip()
    if not (root / "sft").is_dir():
        raise ValueError(f"{root} is not a release folder (no sft/) and names no LATEST release")
    return root


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--subsets takes numbers of system messages such as 1,2,3, not {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from facets.flows.commands.bench import prefect_environment, run_flow
    from facets.release.data_report import report_files

    try:
        release = resolve_release(args.release)
        counts = _counts(args.subsets) if args.subsets else ()
        if args.artifacts:
            prefect_environment()
            from facets.flows.data_report import data_report

            done = run_flow(lambda _: data_report(str(release), args.seed, args.max_pairs, args.max_instructions), None)
        else:
            done = report_files(release, args.seed, args.max_pairs, args.max_instructions)
        print(done["markdown"])
        print(f"report: {done['files']['markdown']}")
        if counts:
            from facets.release.subsets import write_subsets

            for subset in write_subsets(release, args.subsets_out, counts, args.seed):
                print(f"subset sft-{subset.per_instruction}: {subset.rows} rows of {subset.instructions} instructions "
                      f"at {subset.path}" + (f" ({subset.short} instructions have fewer)" if subset.short else ""))
    except (ValueError, OSError) as exc:
        print(f"facets report: error: {exc}", file=sys.stderr)
        return 2
    return 0
