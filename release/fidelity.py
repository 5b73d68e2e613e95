"""How a build's settings differ from the paper's: the release card's "Fidelity" section.

The paper's settings are the `paper` profile (schemas/profiles/paper.yaml); a build made with that profile
differs in nothing it sets, and the section then says what the paper left unknown instead.
"""
from __future__ import annotations

from typing import Any

from facets.schemas.profiles import load_profile
from facets.schemas.stages import LLM_STAGES

PAPER_SOURCES = ("nectar", "openhermes", "ultrafeedback", "chatbot_arena", "dsp")
NOT_PUBLISHED = ("The paper published no sampling settings for the generation stages: the profile uses temperature "
                 "1.0 and top_p 0.9, as the paper's repository does for its other calls, and this project's "
                 "max_tokens defaults.")


def differences(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(setting, this build, the paper) for each setting of the paper profile that this build sets otherwise."""
    paper = load_profile("paper")
    rows = []

    def compare(setting: str, ours: Any, theirs: Any) -> None:
        if ours != theirs:
            rows.append((setting, _text(ours), _text(theirs)))

    for stage in LLM_STAGES:
        ours, theirs = config.get("stages", {}).get(stage, {}), paper["stages"][stage]
        compare(f"{stage}: model", ours.get("model") or config.get("endpoint", {}).get("model"), theirs["model"])
        for key, value in theirs["sampling"].items():
            compare(f"{stage}: {key}", ours.get("sampling", {}).get(key), value)
    for key in ("limit", "sets_per_instruction", "system_message_from"):
        compare(key, config.get(key), paper[key])
    rows += _source_mix(config.get("quotas") or {}, paper["quotas"])
    names = sorted({spec.split("=", 1)[0] for spec in config.get("sources") or []})
    if names and set(names) != set(PAPER_SOURCES):
        rows.append(("sources", ", ".join(names), ", ".join(PAPER_SOURCES)))
    return rows


def unknowns(config: dict[str, Any]) -> list[str]:
    """What the paper left unknown that this build had to choose: said even when nothing differs."""
    notes = [NOT_PUBLISHED]
    unknown = [group for group, count in (config.get("quotas") or {}).items() if count is None]
    if unknown:
        notes.append(f"Published instruction counts unknown for {', '.join(unknown)}: those instructions were drawn "
                     "after the known ones, in seeded order, to fill the limit.")
    return notes


def _source_mix(ours: dict[str, int | None], theirs: dict[str, int | None]) -> list[tuple[str, str, str]]:
    known = {group: count for group, count in theirs.items() if count is not None}
    if not ours:
        return [("source mix", "the pool in seeded order (no quotas)",
                 f"published counts for {len(known)} original sources ({sum(known.values()):,} instructions)")]
    return [(f"quota {group}", _text(ours.get(group)), _text(count)) for group, count in known.items()
            if ours.get(group) != count]


def _text(value: Any) -> str:
    if value is None:
        return "not set"
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
