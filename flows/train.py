"""The `train` flow: SFT, DPO, ORPO or a reward model on a release, on one GPU in this process or on several
through `accelerate launch` (training/launch.py); the loss curve and the metrics become Prefect artifacts.

A run that stops (crash, cancel, a worker lost) resumes from the last checkpoint in its output folder
when it is started again with the same config.
"""
from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from facets.schemas.training import TrainConfig
from facets.training.launch import gpu_memory_gib, launch_command, processes_for, stop_with_workers


def prefect_progress():
    """A Trainer callback: progress as a Prefect artifact, one log line per logging step (main process)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from transformers import TrainerCallback

    class PrefectProgress(TrainerCallback):
        artifact = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            if "loss" in logs:
                get_run_logger().info("step %d/%d: %s", state.global_step, state.max_steps, step_line(logs))
            percent = 100 * state.global_step / max(1, state.max_steps)
            if self.artifact is None:
                self.artifact = create_progress_artifact(percent, key="train-progress")
            else:
                update_progress_artifact(self.artifact, percent)

    return PrefectProgress()


def step_line(logs: dict) -> str:
    """loss 2.3456, lr 1.25e-06, grad norm 0.6118: rounded as a person reads them."""
    parts = [f"loss {logs['loss']:.4f}"]
    if "learning_rate" in logs:
        parts.append(f"lr {logs['learning_rate']:.3g}")
    if "grad_norm" in logs:
        parts.append(f"grad norm {logs['grad_norm']:.4g}")
    return ", ".join(parts)


# log_prints stays off for the flow and its tasks: `datasets` hashes functions with dill, which reads a
# function's globals from `dis.dis` output printed into a captured stdout; Prefect's print patch sends
# that print to the run log instead (hundreds of bytecode lines) and dill finds no globals at all.
@task(name="check-inputs", cache_policy=NO_CACHE, log_prints=False)
def check(config: TrainConfig) -> tuple[TrainConfig, dict | None]:
    """The checked config, and the summary of the run when it already finished in its output folder."""
    from facets.training.run import check_inputs, finished_run, resolve_device

    from facets.training.sharding import resolve_sharding

    checked = check_inputs(config)
    done = finished_run(checked)
    if done is not None:
        return checked, done.model_dump(mode="json")
    on_gpu = resolve_device(checked) == "cuda"
    checked, memory = resolve_sharding(checked, processes_for(checked), gpu_memory_gib() if on_gpu else None)
    logger = get_run_logger()
    if memory is None:
        logger.info("memory plan: the shape of %s is not known before loading it", checked.base_model)
    elif memory.fits or not on_gpu:
        logger.info("%s", memory.text())
    else:
        logger.warning("%s", memory.text())
    return checked, None


@task(name="train-in-process", cache_policy=NO_CACHE, log_prints=False)
def train_here(config: TrainConfig) -> dict:
    from facets.training.run import train

    return train(config, callbacks=[prefect_progress()]).model_dump(mode="json")


@task(name="train-accelerate", cache_policy=NO_CACHE, log_prints=False)
def train_launched(config: TrainConfig, processes: int) -> dict:
    from facets.training.run import CONFIG_FILE, SUMMARY_FILE

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config_file = output / f"launch_{CONFIG_FILE}"
    config_file.write_text(config.model_dump_json(indent=2))
    launcher = subprocess.Popen(launch_command(config, config_file, processes))
    try:
        code = launcher.wait()
    finally:
        stop_with_workers(launcher)  # a cancelled task must not leave training processes behind
    if code != 0:
        raise subprocess.CalledProcessError(code, "accelerate launch")
    return json.loads((output / SUMMARY_FILE).read_text())


def publish_artifacts(result: dict) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from facets.training.metrics import LOSS_CURVE_FILE, loss_points, read_metrics

    records = read_metrics(result["output_dir"])
    create_table_artifact([{"step": s, "loss": round(loss, 4)} for s, loss in loss_points(records)],
                          key="train-loss", description=f"{result['method']} training loss per logged step")
    curve = Path(result["output_dir"]) / LOSS_CURVE_FILE
    picture = ""
    if curve.is_file():
        picture = f"![loss curve](data:image/png;base64,{base64.b64encode(curve.read_bytes()).decode()})\n\n"
    lengths = result["lengths"]
    create_markdown_artifact(
        f"# {result['method']} on {result['release']}\n\n{picture}"
        f"| steps | final loss | tokens | tokens/s | rows kept | rows too long |\n|---|---|---|---|---|---|\n"
        f"| {result['steps']} | {result['final_loss']} | {result['tokens_seen']} | {result['tokens_per_second']} "
        f"| {lengths['kept']} | {lengths['too_long']} |\n\nModel: `{result['output_dir']}`",
        key="train-summary", description="training summary")
    evaluation = result.get("evaluation")
    if evaluation:
        create_table_artifact([evaluation], key="rm-accuracy",
                              description="reward model: share of rm test pairs whose chosen answer scores higher")


@flow(name="train", log_prints=False, persist_result=False)
def train(config: TrainConfig) -> dict:
    """Train on a release with the paper's recipe for the method, unless the config overrides it; a run
    already finished in its output folder is not trained again (a larger max_steps goes on from it)."""
    logger = get_run_logger()
    config, done = check(config)
    if done is not None:
        logger.info("%s already trained: %d steps, final loss %s (%s); pass a larger max_steps to go on, or "
                    "--no-resume to start over", done["output_dir"], done["steps"], done["final_loss"],
                    "train_summary.json")
        publish_artifacts(done)
        return done
    processes = processes_for(config)
    logger.info("%s on %s (%s) from %s -> %s, %d process(es), sharding %s", config.method, config.release,
                config.subset, config.base_model, config.output_dir, processes, config.sharding)
    launched = processes > 1 or config.sharding == "fsdp"
    result = train_launched(config, processes) if launched else train_here(config)
    lengths = result["lengths"]
    if lengths["too_long"]:
        logger.warning("%d of %d rows were longer than %d tokens and left out", lengths["too_long"], lengths["rows"],
                       lengths["max_length"])
    publish_artifacts(result)
    logger.info("model saved to %s (%d steps, final loss %s)", result["output_dir"], result["steps"], result["final_loss"])
    if result.get("evaluation"):
        logger.info("reward model accuracy on the rm test split: %s over %d pairs", result["evaluation"]["accuracy"],
                    result["evaluation"]["pairs"])
    return result
