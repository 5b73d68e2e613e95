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
    "train": ("facets.flows.commands.train", "Train SFT, DPO, ORPO or a reward model on a release with the paper's recipe (sharded when it must be)"),
    "bench": ("facets.flows.commands.bench", "Build the Multifaceted Bench: system messages, reference answers, rubrics"),
    "eval": ("facets.flows.commands.eval", "Generate responses on the bench and grade them with an LLM judge"),
    "report": ("facets.flows.commands.report", "A release's data report (ROUGE-L, coverage, lengths) and 1/2/3-message subsets"),
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


# Commands that write a data dir (and so may create it); the others read one that exists, or none.
WRITERS = frozenset({"ingest", "build", "bench", "eval", "train", "server"})


def prefect_home_by_default(argv: list[str]) -> None:
    """Prefect keeps its state (profiles, the embedded server's SQLite database) in `.prefect` of the
    command's local data dir (`--data-dir`, else ./data; `facets server`: the project's data/), not in
    ~/.prefect; a PREFECT_HOME the user set wins. Set before Prefect reads its settings."""
    if os.environ.get("PREFECT_HOME") or not argv:
        return
    command, flags = argv[0], argv[1:]
    data_dir = _flag(flags, "--data-dir") or os.path.join(_flag(flags, "--project-dir") or ".", "data")
    if "://" in data_dir:  # object storage: Prefect's state stays on this machine
        data_dir = "data"
    if command not in WRITERS and not os.path.isdir(data_dir):
        return  # a data dir a reader is about to find missing is not created by it
    home = os.path.abspath(os.path.join(data_dir, ".prefect"))
    try:
        os.makedirs(home, exist_ok=True)  # Prefect makes only the last folder
    except OSError:
        return  # Prefect's default; the command itself reports the unwritable data dir
    os.environ["PREFECT_HOME"] = home


def _flag(argv: list[str], name: str) -> str | None:
    """The value of `name VALUE` or `name=VALUE` in argv (the last one, as argparse takes it)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg[len(name) + 1:]
    return value


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a process of its own (a caller passing argv keeps its own Prefect settings)
        prefect_home_by_default(sys.argv[1:])
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
