"""Named starting points of a build config, shipped as YAML files beside this module: `paper` holds the
paper's settings. A config that names a profile starts from its file; the config's own fields win."""
from __future__ import annotations

from pathlib import Path
from typing import Any

PROFILES = Path(__file__).parent


def profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILES.glob("*.yaml"))


def load_profile(name: str) -> dict[str, Any]:
    import yaml

    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"no profile {name!r}; profiles: {', '.join(profile_names())}")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, nested mappings merged key by key (a config's `stages.responses.model` keeps the
    profile's sampling of that stage)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
