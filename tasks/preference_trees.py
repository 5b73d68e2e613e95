"""Stage 1: per instruction, the LLM builds dimension -> subdimension -> preference for the four dimensions."""
from __future__ import annotations

import json
from pathlib import Path

from facets.schemas import PreferenceTree, PreferenceTreeBody
from facets.pipeline.context import BuildContext, Key, Request
from facets.pipeline.shard import Shard
from facets.llm.dialects import json_schema_format
from facets.tasks.templates import Template

STAGE = "preference_trees"
SEEDS = Path(__file__).parent / "seed_preferences.json"
TEMPLATE_DATA = (SEEDS,)  # the seeds are part of the prompt: editing them re-keys the trees


def seeds_text(path: Path = SEEDS) -> str:
    """The curated examples as compact lines: `style / clarity: Simple vocabulary; Concise and accurate`."""
    dimensions = json.loads(path.read_text(encoding="utf-8"))["dimensions"]
    return "\n".join(
        f"- {dimension} / {subdimension}: {'; '.join(preferences)}"
        for dimension, branches in dimensions.items()
        for subdimension, preferences in branches.items()
    )


async def run(ctx: BuildContext, shard: Shard) -> None:
    template, model, seeds = ctx.templates[STAGE], ctx.config.model_of(STAGE), seeds_text()

    def request(key: Key) -> Request:
        iid = key[0]
        fp = shard.plans[iid].preference_trees
        messages = template.messages(seeds=seeds, instruction=shard.instructions[iid].text)
        call = ctx.prepare(STAGE, messages, schema=PreferenceTreeBody)
        return Request(key, call, lambda body: PreferenceTree(
            instruction_id=iid, fingerprint=fp, model=model, dimensions=body.dimensions))

    await ctx.fill(STAGE, shard, lambda todo: ctx.ask(STAGE, shard, [request(k) for k in todo]))


def typical_prompt(template: Template, instruction: str) -> tuple[list[dict], int]:
    """A call's messages for a typical instruction, and the characters its response format adds (estimates)."""
    return (template.messages(seeds=seeds_text(), instruction=instruction),
            len(str(json_schema_format(PreferenceTreeBody))))
