"""A whole config given with `--config FILE`: JSON, or YAML by its suffix.

A file that cannot be read, does not parse, or is not a mapping of fields raises `ConfigFileError`, a
ValueError whose one line names the file and the problem; `config_problem` words any refused config so."""
from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError


class ConfigFileError(ValueError):
    """A --config file that is not a config: its message names the file and the problem, on one line."""


def read_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigFileError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigFileError(f"{path}: {exc.strerror or exc}") from None
    data = _parse_yaml(path, text) if path.suffix in (".yaml", ".yml") else _parse_json(path, text)
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: a config is a mapping of field names to values, not {_kind(data)}")
    return data


def section(data: dict, key: str, path: Path | None = None, parent: str = "") -> dict:
    """`data[key]`, a nested mapping of fields (made empty when missing), for flags to be set in;
    `parent`: the dotted name of `data` in the config, for the message."""
    value = data.setdefault(key, {})
    if not isinstance(value, dict):
        raise ConfigFileError(f"{path or 'config'}: {parent}{key} is a mapping of field names to values, "
                              f"not {_kind(value)}")
    return value


def config_problem(error: Exception, path: Path | None) -> str:
    """A refused config in one line, naming the file when it came from one."""
    from facets.schemas.config import config_error

    text = " ".join(config_error(error).split())
    if path is not None and isinstance(error, ValidationError):
        return f"{path}: {text}"
    return text


def _parse_yaml(path: Path, text: str):
    import yaml

    try:
        return yaml.safe_load(text) or {}  # an empty file is an empty config
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigFileError(f"{path}: not valid YAML: {problem}{where}") from None


def _parse_json(path: Path, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None


def _kind(value) -> str:
    """What a value is, without the value (it may be a key)."""
    if value is None:
        return "null"
    kinds = {bool: "true/false", int: "a number", float: "a number", str: "a string", list: "a list"}
    return kinds.get(type(value), f"a {type(value).__name__}")
