"""Prompt templates: text files beside their stages, versioned by their content (docs/ARCHITECTURE.md, principle 1).

A template file has a `### system` and a `### user` section with `$name` placeholders (`string.Template`,
so the braces of code and JSON in instructions need no escaping). Its version is a hash of the file and of
any data file it draws on, so editing either re-keys the stage's fingerprints and recomputes exactly what
depends on it. A user's own directory may shadow the bundled files by name.
"""
from __future__ import annotations

import hashlib
import re
import string
from dataclasses import dataclass
from pathlib import Path

BUNDLED = Path(__file__).parent / "prompts"
_SECTION = re.compile(r"^### (system|user)[ \t]*$", re.MULTILINE)


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Template:
    name: str
    path: str
    system: string.Template
    user: string.Template
    version: str

    def messages(self, **fields: str) -> list[dict]:
        try:
            return [
                {"role": "system", "content": self.system.substitute(fields)},
                {"role": "user", "content": self.user.substitute(fields)},
            ]
        except KeyError as missing:
            raise TemplateError(f"template {self.path} uses ${missing.args[0]}, which this stage does not provide") from None


# Templates are named after their stage (docs/ARCHITECTURE.md, "Stages"); a user's directory may still hold
# files under their earlier names, which would otherwise be passed over without a word.
RENAMED = {"preference_tree": "preference_trees", "system_message": "system_messages", "gold_response": "responses",
           "rubric": "bench_rubrics"}


def load_template(name: str, directory: str | Path | None = None, depends_on: tuple[Path, ...] = ()) -> Template:
    """`<directory>/<name>.txt` when it exists, else the bundled one."""
    path = Path(directory) / f"{name}.txt" if directory else None
    _refuse_old_name(name, directory)
    if path is None or not path.exists():
        path = BUNDLED / f"{name}.txt"
    text = path.read_text(encoding="utf-8")
    parts = _SECTION.split(text)
    sections = dict(zip(parts[1::2], (p.strip("\n") for p in parts[2::2])))
    if set(sections) != {"system", "user"}:
        raise TemplateError(f"template {path} needs exactly one '### system' and one '### user' section")
    digest = hashlib.sha256(text.encode("utf-8"))
    for extra in depends_on:
        digest.update(extra.read_bytes())
    return Template(name, str(path), string.Template(sections["system"]), string.Template(sections["user"]),
                    f"{name}@{digest.hexdigest()[:12]}")


def _refuse_old_name(name: str, directory: str | Path | None) -> None:
    if directory is None or (Path(directory) / f"{name}.txt").exists():
        return
    for old, new in RENAMED.items():
        if new == name and (Path(directory) / f"{old}.txt").exists():
            raise TemplateError(f"{Path(directory) / f'{old}.txt'} is no longer read: templates are named after "
                                f"their stage now; rename it to {name}.txt")
