"""Commands printed for the user to type: named as the environment running this command has them
(`.venv/bin/facets`, `.venv/bin/python`), so they run as printed whether or not its virtualenv is active."""
from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path

# what stands in for a console script the environment does not have
MODULES = {"facets": "facets.flows.cli", "prefect": "prefect"}


def command(name: str) -> str:
    """`python`, `facets` or `prefect` of this interpreter's environment: the bare name where the shell
    finds exactly that one, else its path (relative to the current directory when it is inside it)."""
    python = Path(sys.executable)  # not resolved: a venv's python is a link to the system's
    path = python if name == "python" else python.with_name(name)
    if not path.exists():
        return f"{command('python')} -m {MODULES[name]}"
    found = shutil.which(name)
    if found and os.path.samefile(found, path) and Path(found).parent == path.parent:
        return name
    return shlex.quote(_shown(path))


def _shown(path: Path) -> str:
    absolute = Path(os.path.abspath(path))
    try:
        shown = str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)
    return shown if os.sep in shown else f".{os.sep}{shown}"  # a bare name would be looked up on PATH
