"""The `janus` flow: the paper's suite on one release, each model a `train` subflow run.

Janus (SFT on `sft`), Janus* (SFT on `small`), Janus+DPO (from Janus*), Janus+ORPO (from the base model),
the 1-epoch SFT the reward model starts from, and Janus-RM (stage 1 on `rm`; stage 2 on general pairs when
they are given). Every step is the `train` flow: it resumes from its last checkpoint, returns at once when
its model is already trained, and publishes its own artifacts; a step whose start is missing fails and
stops the suite there (nothing after it would have its starting model).
"""
from __future__ import annotations

from prefect import flow, get_run_logger

from facets.flows.train import train
from facets.schemas.training import JanusConfig


@flow(name="janus", log_prints=False, persist_result=False)
def janus(config: JanusConfig) -> dict:
    """Train the Janus suite on a release, skipping the models already trained."""
    logger = get_run_logger()
    results: dict[str, dict] = {}
    for name, step in config.steps():
        logger.info("%s: %s on %s from %s -> %s", name, step.method, step.subset, step.base_model, step.output_dir)
        result = train.with_options(flow_run_name=f"janus/{name}")(step)
        results[name] = result
        state = "already trained" if result.get("already_trained") else "trained"
        logger.info("%s %s: %d steps, final loss %s", name, state, result["steps"], result["final_loss"])
    return {name: {k: r.get(k) for k in ("output_dir", "steps", "final_loss", "already_trained", "evaluation")}
            for name, r in results.items()}
