"""The `facets` command line: one subcommand per module, imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Each module exposes `configure(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "ingest": ("facets.flows.commands.ingest", "Ingest instruction sources into the instructions stage"),
    "simulate": ("facets.flows.commands.simulate", "Run the loopback OpenAI-compatible simulator"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="facets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    args, _ = parser.parse_known_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    command_parser = argparse.ArgumentParser(prog=f"facets {args.command}", description=COMMANDS[args.command][1])
    module.configure(command_parser)
    argv = sys.argv[1:] if argv is None else argv
    return int(module.run(command_parser.parse_args(argv[argv.index(args.command) + 1 :])) or 0)


if __name__ == "__main__":
    sys.exit(main())
