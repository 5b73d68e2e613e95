"""The `build-bench` and `evaluate` flows: the Multifaceted Bench, then models generating on it and a judge.

`build-bench` reads the five benchmarks' prompts, leaves out those already in a training release, and
runs them through the build's own stages (docs/ARCHITECTURE.md, decision 11) with one preference set per item: a
preference tree, the set, a system message and a gold response (the reference answer); then its own
stage, one rubric per preference. Items with all their rows become `releases/<version>/bench/`.

`evaluate` has a response generated for every bench item by each model under test (served or local),
has a judge grade each response on each rubric in N runs, and publishes the summary table (models by
mf-AlpacaEval ... mf-Self-Instruct and Average, with coverage) as files and as Prefect artifacts.
"""
from __future__ import annotations

import asyncio
import time

from prefect import flow, get_run_logger, runtime, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from facets.evaluation.bench_build import run_bench_build
from facets.schemas.evaluation import BenchConfig, EvalConfig
from facets.storage import Store
from facets.evaluation.bench_release import load_bench


@flow(name="build-bench", log_prints=True, persist_result=False)
async def build_bench(config: BenchConfig) -> dict:
    """Build the Multifaceted Bench from benchmark prompts and publish it as `releases/<version>/bench/`."""
    return await run_bench_build(config, get_run_logger(), flow_run=str(runtime.flow_run.id))


# -- evaluate ------------------------------------------------------------------------------------------
class EvalReport(BaseModel):
    bench: str
    generated: dict[str, dict] = Field(default_factory=dict)   # label -> generation report
    judged: dict | None = None
    summary: list[dict] = Field(default_factory=list)
    published: list[dict] = Field(default_factory=list)         # the paper's Table 2 rows (published bench)
    markdown: str = ""
    outputs: dict[str, str] = Field(default_factory=dict)
    seconds: float = 0.0


@task(name="generate", cache_policy=NO_CACHE, task_run_name="generate-{label}")
async def generate_task(config: EvalConfig, label: str) -> dict:
    from dataclasses import asdict

    from facets.evaluation.generate import generate

    spec = next(m for m in config.models if m.key == label)
    report = await generate(config, spec, load_bench(config.bench), Store(config.data_dir))
    return asdict(report)


@task(name="judge", cache_policy=NO_CACHE)
async def judge_task(config: EvalConfig, labels: list[str]) -> dict:
    from facets.evaluation.judge import judge_models, summary_markdown, summary_rows

    report = await judge_models(config, load_bench(config.bench), labels, Store(config.data_dir))
    return {"judged": report.judged, "reused": report.reused, "failed": report.failed,
            "missing_responses": report.missing_responses, "usage": report.usage,
            "summary": summary_rows(report.summary), "published": summary_rows([], report.published),
            "markdown": summary_markdown(report.summary, report.published, report.notes), "outputs": report.outputs}


@flow(name="evaluate", log_prints=True, persist_result=False)
async def evaluate(config: EvalConfig) -> dict:
    """Generate responses to the bench for each model, judge them, and publish the summary table."""
    from facets.evaluation.judge import response_labels

    started = time.monotonic()
    logger = get_run_logger()
    bench = load_bench(config.bench)
    labels = [m.key for m in config.models]
    if len(set(labels)) != len(labels):
        raise ValueError(f"two models share a label: {labels}; give each a distinct label")
    report = EvalReport(bench=bench.version)
    if "generate" in config.steps:
        if not config.models:
            raise ValueError("nothing to generate: name at least one model")
        served = [m.key for m in config.models if not m.local_model]
        results = await asyncio.gather(*(generate_task(config, label) for label in served))
        report.generated.update(zip(served, results))
        for spec in config.models:  # local models one at a time: they share the accelerator
            if spec.local_model:
                report.generated[spec.key] = await generate_task(config, spec.key)
        for label, g in report.generated.items():
            logger.info("%s: %d of %d responses (%d reused, %d made, %d failed, %d cut at max_tokens)",
                        label, g["reused"] + g["made"], g["items"], g["reused"], g["made"], g["failed"], g["truncated"])
            for note in g.get("notes", []):
                logger.warning("%s: %s", label, note)
    if "judge" in config.steps:
        labels = labels or response_labels(Store(config.data_dir), bench.version)
        if not labels:
            raise ValueError(f"no responses to judge for bench {bench.version} in {config.data_dir}")
        judged = await judge_task(config, labels)
        report.summary, report.markdown, report.outputs = judged.pop("summary"), judged.pop("markdown"), judged.pop("outputs")
        report.published = judged.pop("published")
        report.judged = judged
        from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact

        beside = " beside the paper's Table 2 (rows marked published)" if report.published else ""
        await acreate_table_artifact(report.summary + report.published, key="evaluate-summary",
                                     description=f"Multifaceted Bench {bench.version}: mean judge score (1-5) per "
                                                 f"benchmark{beside}")
        await acreate_markdown_artifact(f"## Multifaceted Bench {bench.version}\n\n{report.markdown}",
                                        key="evaluate-report", description="models by benchmark, with coverage")
        logger.info("\n%s", report.markdown)
    report.seconds = round(time.monotonic() - started, 3)
    return report.model_dump(mode="json")
