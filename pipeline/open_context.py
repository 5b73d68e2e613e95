"""A build's context, opened: the endpoint checked, its structured-output dialect found, and one gateway per
LLM stage over one journal, one spend cap, one set of call slots and one pace per model."""
from __future__ import annotations

from facets.llm.batch import BatchRunner
from facets.llm.budget import Budget
from facets.llm.gateway import Gateway, endpoint_transport
from facets.llm.journal import Journal
from facets.llm.limiters import Limiters
from facets.llm.preflight import check_endpoint, choose_structured_output
from facets.llm.slots import CallSlots
from facets.pipeline.context import BuildContext
from facets.schemas.config import BuildConfig
from facets.schemas.stages import LLM_STAGES
from facets.storage import Store
from facets.storage.failure_log import FailureLog, recover_failures
from facets.storage.scratch import sweep as sweep_scratch
from facets.tasks.stages import load_templates


async def open_context(config: BuildConfig, store: Store, preflight: bool = True,
                       stored: dict[str, list[str]] | None = None, journal: Journal | None = None) -> BuildContext:
    """Checks the endpoint and prices, then one gateway per LLM stage over one journal and one budget;
    `stored`: the stage files to look for stored rows in (default: those there now)."""
    models = sorted({config.model_of(stage) for stage in LLM_STAGES})
    if preflight:
        await check_endpoint(config.endpoint, models)
    journal = Journal(config.data_dir) if journal is None else journal
    if preflight:  # the structured-output dialect, resolved into the config the gateways and shard runs get
        endpoint = await choose_structured_output(config.endpoint, [config.model_of("preference_trees")], journal)
        config = config.model_copy(update={"endpoint": endpoint})
    budget = Budget(config.endpoint.max_cost)
    slots, transport = CallSlots(config.endpoint.limits), endpoint_transport(config.endpoint)
    limiters = Limiters()  # one pace per model for all stages of the build
    gateways = {stage: Gateway(config.endpoint, journal, budget, slots, priority=LLM_STAGES.index(stage),
                               transport=transport, limiters=limiters) for stage in LLM_STAGES}
    recover_failures(store)  # those a stopped build kept as they happened and had not written yet
    sweep_scratch(store)  # what killed writers left: staged releases, DuckDB spill, temporary files
    for stage, gateway in gateways.items():
        gateway.failure_log = FailureLog(store, stage)
    for model in models:
        gateways["responses"].check_price(model)
    batches = None
    if config.mode == "batch":
        batches = {stage: BatchRunner(gateways[stage], config.data_dir, poll_initial_s=config.batch_poll_s)
                   for stage in LLM_STAGES}
    return BuildContext(config, store, load_templates(config), gateways, batches, stored, transport)

