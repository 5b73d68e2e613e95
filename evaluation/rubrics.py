"""The bench's own stage: one rubric per preference of an item's set (4 calls per item), JSON via the gateway.

A rubric is a criteria question and score descriptions for 1-5, asked for with three example rubrics and
one preference (the paper's rubric generation). Its input is the preference set alone, so its fingerprint
chains on the set's: the items of the bench reuse stored rubrics exactly as the build's stages reuse
their rows. Rows live in `stages/bench_rubrics/`, labelled by shard like every stage's files.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

from facets.schemas import Preference, Rubric, fingerprint, from_table, to_table
from facets.schemas.config import BuildConfig, StageSettings
from facets.schemas.stages import BENCH_RUBRICS
from facets.schemas.evaluation import BenchRubric
from facets.pipeline.context import BuildContext, Key, Request
from facets.pipeline.shard import Shard, StageCount, _overlaps, write_failures
from facets.tasks.plan import StagePlan
from facets.tasks.templates import Template, load_template

STAGE = BENCH_RUBRICS
TEMPLATE = STAGE  # templates are named after their stage
EXAMPLES = Path(__file__).parent / "bench_rubric_examples.json"
PREFERENCES_PER_SET = 4
MIN_CRITERIA_CHARS = 10


class BenchContext(BuildContext):
    """The build's context with one set per item and the rubric stage's own settings."""

    def __init__(self, config: BuildConfig, store, templates: dict[str, Template], gateways, batches=None,
                 rubrics: StageSettings | None = None):
        super().__init__(config, store, templates, gateways, batches)
        self.rubrics = rubrics or StageSettings()
        self.plan = StagePlan.of(config, templates, sets=1)  # a bench item has one preference set

    def prepare(self, stage: str, messages: list[dict], **options: Any):
        if stage == STAGE:
            return self.gateways[stage].prepare(messages, self.rubrics.sampling, model=self.rubric_model, **options)
        return super().prepare(stage, messages, **options)

    @property
    def rubric_model(self) -> str:
        return self.rubrics.model or self.config.endpoint.model


def load_rubric_template(directory: str | None = None) -> Template:
    return load_template(TEMPLATE, directory, depends_on=(EXAMPLES,))


def examples_text(path: Path = EXAMPLES) -> str:
    examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    return "\n\n".join(json.dumps(e["rubric"], indent=4, ensure_ascii=False) for e in examples)


def describe_preference(preference: Preference) -> str:
    return (f"dimension: {preference.dimension}\nsubdimension: {preference.subdimension}\n"
            f"preference: {preference.preference}\ndescription: {preference.description}")


def check_rubric(rubric: Rubric) -> None:
    """ValueError naming what is wrong with a generated rubric."""
    if len(rubric.criteria.strip()) < MIN_CRITERIA_CHARS:
        raise ValueError(f"criteria too short: write one question of at least {MIN_CRITERIA_CHARS} characters")
    descriptions = [d.strip() for d in rubric.score_descriptions.model_dump(by_alias=True).values()]
    if not all(descriptions):
        raise ValueError("every score 1-5 needs a description")
    if len({d.casefold() for d in descriptions}) < len(descriptions):
        raise ValueError("score descriptions repeat: each score 1-5 needs its own description")


def rubric_fingerprint(ctx: BenchContext, sets_fingerprint: str) -> str:
    template = ctx.templates[TEMPLATE]
    return fingerprint(STAGE, sets_fingerprint, template.version, ctx.rubric_model,
                       ctx.rubrics.sampling.request_fields())


def stored_rubrics(ctx: BuildContext, shard: Shard, wanted: dict[Key, str]) -> dict[Key, BenchRubric]:
    """Rows already stored for `wanted` keys ((instruction id, preference index) -> fingerprint)."""
    files = [f for f in ctx.store.files(STAGE) if _overlaps(f, shard.lo, shard.hi)]
    if not files or not wanted:
        return {}
    dataset = ds.dataset(files, format="parquet", filesystem=ctx.store.fs)
    table = dataset.to_table(filter=ds.field("instruction_id").isin(sorted({i for i, _ in wanted}))
                             & ds.field("fingerprint").isin(sorted(set(wanted.values()))))
    found: dict[Key, BenchRubric] = {}
    for row in from_table(table, BenchRubric):
        key = (row.instruction_id, row.set_index)
        if wanted.get(key) == row.fingerprint:
            found.setdefault(key, row)
    return found


async def run(ctx: BenchContext, shard: Shard) -> None:
    sets = shard.rows.get("preference_sets", {})
    alive = shard.alive("responses")  # items with a reference answer: no rubric is paid for a lost item
    wanted = {(iid, k): rubric_fingerprint(ctx, shard.plans[iid].preference_sets)
              for iid in alive for k in range(PREFERENCES_PER_SET)}
    template, model, examples = ctx.templates[TEMPLATE], ctx.rubric_model, examples_text()

    def request(key: Key) -> Request:
        iid, k = key
        preference = sets[(iid, 0)].preferences[k]
        messages = template.messages(examples=examples, preference=describe_preference(preference))
        call = ctx.prepare(STAGE, messages, schema=Rubric, check=check_rubric)
        return Request(key, call, lambda body: BenchRubric(
            instruction_id=iid, fingerprint=wanted[key], set_index=k, dimension=preference.dimension,
            criteria=body.criteria, score_descriptions=body.score_descriptions, model=model,
            prompt_version=template.version))

    found = stored_rubrics(ctx, shard, wanted)
    todo = [key for key in wanted if key not in found]
    made = await ctx.ask(STAGE, shard, [request(k) for k in todo]) if todo else {}
    write_failures(ctx.store, shard, ctx.gateways[STAGE].drain_failures())
    if made:
        ctx.store.write_table(ctx.store.table_dir(STAGE), to_table(list(made.values()), BenchRubric), shard.name)
    shard.rows[STAGE] = {**found, **made}
    shard.counts[STAGE] = StageCount(len(found), len(made), len(todo) - len(made))


def rubrics_of(shard: Shard, instruction_id: str) -> list[BenchRubric] | None:
    """The item's four rubrics in preference order, or None when one is missing."""
    rows = shard.rows.get(STAGE, {})
    found = [rows.get((instruction_id, k)) for k in range(PREFERENCES_PER_SET)]
    return None if any(r is None for r in found) else found
