"""Stage 4: the gold response to an instruction under each of its system messages."""
from __future__ import annotations

from facets.schemas import GoldResponse
from facets.pipeline.context import BuildContext, Key, Request
from facets.pipeline.shard import Shard
from facets.schemas.stages import BY_NAME
from facets.tasks.templates import Template

STAGE = "responses"


def check_response(text: str) -> None:
    if not text.strip():
        raise ValueError("empty response")


async def run(ctx: BuildContext, shard: Shard) -> None:
    template, model = ctx.templates[STAGE], ctx.config.model_of(STAGE)

    def request(key: Key) -> Request:
        iid, k = key
        system = shard.rows["system_messages"][key].text
        messages = template.messages(system_message=system, instruction=shard.instructions[iid].text)
        call = ctx.prepare(STAGE, messages, check=check_response)
        return Request(key, call, lambda text: GoldResponse(
            instruction_id=iid, fingerprint=shard.plans[iid].responses, set_index=k, text=text, model=model,
            prompt_version=template.version))

    await ctx.fill(STAGE, shard, lambda todo: ctx.ask(STAGE, shard, [request(k) for k in todo]))


def typical_prompt(template: Template, instruction: str) -> tuple[list[dict], int]:
    """A call's messages for a typical instruction under a typical system message (estimates)."""
    system = "y" * (BY_NAME["system_messages"].typical_tokens * 4)
    return template.messages(system_message=system, instruction=instruction), 0
