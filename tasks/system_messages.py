"""Stage 3: one system message per preference set: second person, all four preferences in one paragraph.

The checks below turn a reply into a failure (asked again with the reason, then kept in `failures`)
when it is empty or too short, over-long, list-shaped, more than one paragraph, not addressed to the
assistant, or restates the instruction. They are the stage's contract, so each is tested failing.
"""
from __future__ import annotations

import re

from facets.schemas import PreferenceSet, SystemMessage, normalise_text
from facets.pipeline.context import BuildContext, Key, Request
from facets.pipeline.shard import Shard
from facets.tasks.templates import Template

STAGE = "system_messages"
MIN_CHARS, MAX_CHARS = 300, 2500
RESTATE_CHARS = 60  # an instruction prefix this long found in the message counts as restating it
_LIST_LINE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|#+)\s", re.MULTILINE)
_SECOND_PERSON = re.compile(r"\b(?:you|your|yours|yourself)\b", re.IGNORECASE)


def check_system_message(text: str, instruction: str) -> None:
    """ValueError naming what is wrong with a candidate system message."""
    size = len(text.strip())
    if size < MIN_CHARS:
        raise ValueError(f"too short: {size} characters, at least {MIN_CHARS} wanted")
    if size > MAX_CHARS:
        raise ValueError(f"too long: {size} characters, at most {MAX_CHARS} wanted")
    if _LIST_LINE.search(text):
        raise ValueError("list-shaped: write one flowing paragraph, not bullets, numbers or headings")
    if "\n\n" in text.strip():
        raise ValueError("more than one paragraph: write exactly one")
    if len(_SECOND_PERSON.findall(text)) < 2:
        raise ValueError("not in the second person: address the assistant as 'you'")
    prefix = normalise_text(instruction)[:RESTATE_CHARS].lower()
    if len(prefix) == RESTATE_CHARS and prefix in normalise_text(text).lower():
        raise ValueError("restates the instruction: describe the assistant, do not repeat the task")


def describe(preference_set: PreferenceSet, shown: str = "preferences") -> str:
    """The set as the prompt shows it: each preference whole, or (`descriptions`, as the published collection's
    card says it was made) only its description."""
    if shown == "descriptions":
        return "\n".join(f"- {p.description}" for p in preference_set.preferences)
    return "\n".join(
        f'- {p.dimension} ({p.subdimension}): "{p.preference}". {p.description}' for p in preference_set.preferences
    )


async def run(ctx: BuildContext, shard: Shard) -> None:
    template, model = ctx.templates[STAGE], ctx.config.model_of(STAGE)

    def request(key: Key) -> Request:
        iid, k = key
        instruction = shard.instructions[iid].text
        preferences = describe(shard.rows["preference_sets"][key], ctx.config.system_message_from)
        messages = template.messages(preferences=preferences, instruction=instruction)
        call = ctx.prepare(STAGE, messages, check=lambda text: check_system_message(text, instruction))
        return Request(key, call, lambda text: SystemMessage(
            instruction_id=iid, fingerprint=shard.plans[iid].system_messages, set_index=k, text=text, model=model,
            prompt_version=template.version))

    await ctx.fill(STAGE, shard, lambda todo: ctx.ask(STAGE, shard, [request(k) for k in todo]))


def typical_prompt(template: Template, instruction: str) -> tuple[list[dict], int]:
    """A call's messages for a typical instruction and preference set (estimates)."""
    return template.messages(preferences="z" * 800, instruction=instruction), 0
