"""A whole config given with `--config FILE`: JSON, or YAML by its suffix."""
from __future__ import annotations

import json
from pathlib import Path


def read_config_file(path: Path | None) -> dict:
    if path is None:
        return {}
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text) or {}
    return json.loads(text)
