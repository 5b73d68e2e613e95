"""Stage 4: the gold response to an instruction under each of its system messages."""
from __future__ import annotations

from facets.schemas import GoldResponse
from facets.tasks.context import BuildContext, Key, Request
from facets.tasks.shard import Shard

STAGE = "responses"
TEMPLATE = "gold_response"


def check_response(text: str) -> None:
    if not text.strip():
        raise ValueError("empty response")


async def run(ctx: BuildContext, shard: Shard) -> None:
    systems = shard.rows.get("system_messages", {})
    alive = set(shard.alive("system_messages"))
    wanted = {key: shard.plans[key[0]].responses for key in systems if key[0] in alive}
    template, model = ctx.templates[TEMPLATE], ctx.config.model_of(STAGE)

    def request(key: Key) -> Request:
        iid, k = key
        messages = template.messages(system_message=systems[key].text, instruction=shard.instructions[iid].text)
        call = ctx.prepare(STAGE, messages, check=check_response)
        return Request(key, call, lambda text: GoldResponse(
            instruction_id=iid, fingerprint=wanted[key], set_index=k, text=text, model=model,
            prompt_version=template.version))

    await ctx.fill(STAGE, shard, wanted, lambda todo: ctx.ask(STAGE, shard, [request(k) for k in todo]))
