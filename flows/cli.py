"""The `facets` command line: one subcommand per module, imported only when it is used."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Each module exposes `configure(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("facets.flows.commands.ingest", "Ingest instruction sources into the instructions stage"),
    "simulate": ("facets.flows.commands.simulate", "Run the loopback OpenAI-compatible simulator"),
    "build": ("facets.flows.commands.build", "Run build-collection: preference trees to releases"),
    "estimate": ("facets.flows.commands.estimate", "Calls, tokens, cost and time of a build, before spending"),
    "inspect": ("facets.flows.commands.inspect", "Run DuckDB SQL over the stages and releases of a data dir"),
    "status": ("facets.flows.commands.status", "Done and missing per stage of a data dir"),
    "server": ("facets.flows.commands.server", "A local Prefect server and worker on 127.0.0.1 with the deployments applied"),
    "train": ("facets.flows.commands.train", "Train SFT, DPO or ORPO on a release with the paper's recipe"),
    "bench": ("facets.flows.commands.bench", "Build the Multifaceted Bench: system messages, reference answers, rubrics"),
    "eval": ("facets.flows.commands.eval", "Generate responses on the bench and grade them with an LLM judge"),
}


def _overview() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="facets", description="Build, train on and evaluate the Multifaceted Collection.")
    parser.add_argument("--version", action="version", version=f"facets {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facets")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def beat_by_default() -> None:
    """Flows run by these commands (a build, a training run) send heartbeats like a worker's runs, set
    before Prefect reads its settings: the server's zombie automations (flows/automations.py) then tell a
    build whose process died from a live one, and a user's own setting wins."""
    from facets.flows.automations import HEARTBEAT_S

    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    beat_by_default()
    if argv[:1] == ["--version"]:
        print(f"facets {_version()}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        _overview().parse_args(argv)  # prints usage, or the error for an unknown command
        _overview().print_help()
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"facets {name}", description=help_text)
    module.configure(parser)
    return int(module.run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
