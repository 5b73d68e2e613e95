"""The release of a build: its accepted instructions' rows, published with what made them."""
from __future__ import annotations

from facets.pipeline.context import BuildContext
from facets.pipeline.report import BuildReport
from facets.pipeline.shard import Shard
from facets.schemas.stages import LLM_STAGES, STAGES


def publish(ctx: BuildContext, shards: list[Shard], report: BuildReport) -> dict:
    from facets.release.publish import ReleaseInfo, publish_release

    info = ReleaseInfo(
        models={stage: ctx.config.model_of(stage) for stage in LLM_STAGES},
        prompt_versions={name: t.version for name, t in ctx.templates.items()},
        usage=report.usage,
        build_seconds=report.seconds, seed=ctx.config.seed,
        config=ctx.config.model_dump(mode="json", exclude={"endpoint": {"api_key"}}),
    )
    release = publish_release(ctx.store, expected_rows(shards), info, seed=ctx.config.seed,
                              test_fraction=ctx.config.test_fraction)
    return {"version": release.version, "path": str(release.path), "is_new": release.is_new}



def expected_rows(shards: list[Shard]):
    """The long (stage, instruction_id, set_index, fingerprint) table of the accepted instructions."""
    import pyarrow as pa

    from facets.tasks.plan import PAIR_INDEX

    columns: dict[str, list] = {"stage": [], "instruction_id": [], "set_index": [], "fingerprint": []}

    def add(stage: str, iid: str, index: int, fp: str) -> None:
        for column, value in zip(columns, (stage, iid, index, fp)):
            columns[column].append(value)

    for shard in shards:
        for iid in shard.accepted():
            plan = shard.plans[iid]
            for stage in STAGES:  # trees are one per instruction and found through its pair
                if stage.rows == "per_set":
                    for index in range(shard.sets):
                        add(stage.name, iid, index, getattr(plan, stage.name))
                elif stage.rows == "pair":
                    add(stage.name, iid, PAIR_INDEX, getattr(plan, stage.name))
    return pa.table(columns, schema=pa.schema([("stage", pa.string()), ("instruction_id", pa.string()),
                                                ("set_index", pa.int64()), ("fingerprint", pa.string())]))

