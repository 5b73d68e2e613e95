"""The Multifaceted Bench built: the five benchmarks' prompts, those already in a training release left out, run
through the build's own stages (docs/ARCHITECTURE.md, decision 11) with one preference set per item: a preference
tree, the set, a system message and a gold response (the reference answer); then its own stage, one rubric per
preference. Items with all their rows become `releases/<version>/bench/`.
"""
from __future__ import annotations

import asyncio
import time
from collections import Counter

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from facets.evaluation import rubrics as bench_rubrics
from facets.evaluation.bench_release import publish_bench, split_contaminated, training_prompts
from facets.evaluation.rubrics import BenchContext, load_rubric_template, rubrics_of
from facets.evaluation.sources import BenchPrompt, load_bench_prompts
from facets.llm.batch import BatchRunner
from facets.llm.budget import Budget
from facets.llm.gateway import Gateway
from facets.llm.journal import Journal
from facets.llm.limiters import Limiters
from facets.llm.preflight import check_endpoint, choose_structured_output
from facets.pipeline.shard import Shard
from facets.pipeline.shard_run import retry_unless_aborted
from facets.schemas import BenchRow, Rubric, instruction_id
from facets.schemas.evaluation import BENCHMARKS, BenchConfig
from facets.schemas.stages import BENCH_STAGES, LLM_STAGES
from facets.storage import Store
from facets.storage.lease import data_dir_lease
from facets.tasks.plan import buckets_per_shard, shard_ranges
from facets.tasks.stages import RUNNERS, load_templates

BENCH_RUNNERS = {**{name: RUNNERS[name] for name in BENCH_STAGES[:-1]}, bench_rubrics.STAGE: bench_rubrics.run}

# an item left out, by the first of its rows that is missing
MISSING = tuple((name, f"{name} missing") for name in BENCH_STAGES[:-1])



@task(name="bench-stage", cache_policy=NO_CACHE, task_run_name="bench-{stage}-{shard.name}", retry_delay_seconds=2)
async def bench_stage(stage: str, ctx: BenchContext, shard: Shard) -> dict[str, int]:
    await BENCH_RUNNERS[stage](ctx, shard)
    return shard.counts[stage].as_dict()


async def open_bench_context(config: BenchConfig, store: Store) -> BenchContext:
    """The build's gateways (one journal, one budget) plus the rubric stage's, after an endpoint check."""
    build = config.build_config()
    models = sorted({build.model_of(stage) for stage in LLM_STAGES} | {config.rubric_model()})
    await check_endpoint(build.endpoint, models)
    journal, budget = Journal(build.data_dir), Budget(build.endpoint.max_cost)
    structured = [build.model_of("preference_trees"), config.rubric_model()]  # the stages that parse JSON
    build = build.model_copy(update={"endpoint": await choose_structured_output(build.endpoint, structured, journal)})
    stages = (*LLM_STAGES, bench_rubrics.STAGE)
    limiters = Limiters()  # one pace per model for all stages of the bench build
    gateways = {stage: Gateway(build.endpoint, journal, budget, limiters=limiters) for stage in stages}
    for model in models:
        gateways["responses"].check_price(model)
    batches = None
    if build.mode == "batch":
        batches = {stage: BatchRunner(gateways[stage], build.data_dir, poll_initial_s=build.batch_poll_s) for stage in stages}
    templates = {**load_templates(build), bench_rubrics.TEMPLATE: load_rubric_template(build.templates_dir)}
    return BenchContext(build, store, templates, gateways, batches, rubrics=config.rubrics)


class BenchReport(BaseModel):
    read: dict[str, int]                      # benchmark -> prompts read
    duplicates: dict[str, int]                # benchmark -> prompts kept by another benchmark
    contaminated: list[dict[str, str]]        # prompts left out as training prompts
    drawn: dict[str, int]                     # benchmark -> prompts sent through the stages
    built: dict[str, int]                     # benchmark -> items with all their rows
    left_out: dict[str, int]                  # reason -> items
    stages: dict[str, dict[str, int]]
    failures: dict[str, int]
    usage: dict[str, dict]
    seconds: float
    release: dict | None = None

    def text(self) -> str:
        lines = [f"{'benchmark':<16}{'read':>7}{'dupes':>7}{'in training':>13}{'drawn':>7}{'built':>7}"]
        gone = Counter(p["benchmark"] for p in self.contaminated)
        for name in BENCHMARKS:
            if self.read.get(name):
                lines.append(f"{name:<16}{self.read.get(name, 0):>7}{self.duplicates.get(name, 0):>7}{gone[name]:>13}"
                             f"{self.drawn.get(name, 0):>7}{self.built.get(name, 0):>7}")
        lines.append(f"{sum(self.built.values())} bench items in {self.seconds:.1f}s")
        if self.contaminated:
            lines.append(f"left out as training prompts: {len(self.contaminated)}, e.g. "
                         + "; ".join(repr(p["prompt"][:60]) for p in self.contaminated[:3]))
        if self.left_out:
            lines.append("left out by failed stages: " + ", ".join(f"{r} x{n}" for r, n in self.left_out.items()))
        if self.release:
            state = "new" if self.release["is_new"] else "unchanged"
            lines.append(f"bench release {self.release['version']} ({state}): {self.release['path']}")
        return "\n".join(lines)


def bench_rows(shards: list[Shard], prompts: dict[str, BenchPrompt]) -> tuple[list[BenchRow], Counter]:
    """The published rows of the items that have every row, and why each other item is left out."""
    rows, left_out = [], Counter()
    for shard in shards:
        for iid, instruction in shard.instructions.items():
            missing = next((reason for stage, reason in MISSING if (iid, 0) not in shard.rows.get(stage, {})), None)
            rubrics = rubrics_of(shard, iid)
            if missing or rubrics is None:
                left_out[missing or "rubric missing"] += 1
                continue
            rows.append(BenchRow(
                source=prompts[iid].source,
                preference_set=list(shard.rows["preference_sets"][(iid, 0)].preferences),
                system=shard.rows["system_messages"][(iid, 0)].text,
                prompt=instruction.text,
                reference_answer=shard.rows["responses"][(iid, 0)].text,
                rubrics=[Rubric(criteria=r.criteria, score_descriptions=r.score_descriptions) for r in rubrics],
            ))
    return rows, left_out


async def run_bench_build(config: BenchConfig, logger, flow_run: str) -> dict:
    """The bench built and published: its report, as JSON."""
    started = time.monotonic()
    if not config.sources:
        raise ValueError("no bench sources: pass NAME=PATH for any of " + ", ".join(BENCHMARKS))
    store = Store(config.data_dir)
    prompts, loaded = load_bench_prompts(config.sources, config.per_benchmark, config.seed)
    training: set[str] = training_prompts(store)
    for other in config.against:
        training |= training_prompts(Store(other))
    kept, removed = split_contaminated(prompts, training)
    if removed:
        logger.warning("left out %d bench prompts that are training prompts", len(removed))
    by_id = {p.id: p for p in kept}
    # the build's stages on its data dir: one at a time with builds there (docs/ARCHITECTURE.md,
    # "One build per data dir")
    async with data_dir_lease(config.data_dir, "build-bench", flow_run=flow_run, logger=logger):
        ctx = await open_bench_context(config, store)
        limit = asyncio.Semaphore(config.max_concurrent_shards)
        stage_task = bench_stage.with_options(retries=config.shard_retries, retry_condition_fn=retry_unless_aborted)
        instructions = [p.instruction for p in kept]
        width = buckets_per_shard(len(instructions), config.shard_size)
        shards = [Shard(lo, hi, group, {i.id: ctx.plan.fingerprints(i.id) for i in group}, 1)
                  for (lo, hi), group in shard_ranges(instructions, width).items()]

        async def one(shard: Shard) -> Shard:
            async with limit:
                shard.open_feeds(BENCH_STAGES)  # the stages run one after another here: each reads a closed feed
                for stage in BENCH_STAGES:
                    await stage_task(stage, ctx, shard)
            return shard

        try:
            await asyncio.gather(*(one(s) for s in shards))
        finally:
            await ctx.aclose()
    rows, left_out = bench_rows(shards, by_id)
    stages = {stage: Counter() for stage in BENCH_STAGES}
    for shard in shards:
        for stage, count in shard.counts.items():
            stages[stage].update({"reused": count.reused, "made": count.made, "failed": count.failed})
    built = Counter(by_id[instruction_id(r.prompt)].benchmark for r in rows)
    report = BenchReport(
        read=dict(loaded.read), duplicates=dict(loaded.duplicates),
        contaminated=[{"benchmark": p.benchmark, "source": p.source, "prompt": p.text} for p in removed],
        drawn=dict(Counter(p.benchmark for p in kept)), built=dict(built), left_out=dict(left_out),
        stages={s: {k: c[k] for k in ("reused", "made", "failed")} for s, c in stages.items()},
        failures=dict(sum((s.failures for s in shards), Counter()).most_common()),
        usage={stage: g.usage.summary() for stage, g in ctx.gateways.items()},
        seconds=round(time.monotonic() - started, 3))
    if config.publish and rows:
        release = publish_bench(store, rows, {
            "models": {**{s: config.build_config().model_of(s) for s in LLM_STAGES}, bench_rubrics.STAGE: config.rubric_model()},
            "prompt_versions": {name: t.version for name, t in ctx.templates.items()},
            "seed": config.seed, "per_benchmark": config.per_benchmark,
            "read": report.read, "duplicates": report.duplicates, "left_out": report.left_out,
            "contaminated": report.contaminated, "usage": report.usage,
        })
        report.release = {"version": release.version, "path": release.path, "rows": release.rows, "is_new": release.is_new}
    from prefect.artifacts import acreate_markdown_artifact

    await acreate_markdown_artifact(f"```\n{report.text()}\n```", key="bench-report", description="build-bench summary")
    logger.info(report.text())
    return report.model_dump(mode="json")
