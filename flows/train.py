"""The `train` flow: SFT, DPO or ORPO on a release, on one GPU in this process or on several through
`accelerate launch`; the loss curve and the metrics become Prefect artifacts.

A run that stops (crash, cancel, a worker lost) resumes from the last checkpoint in its output folder
when it is started again with the same config.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from facets.schemas.training import TrainConfig


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def processes_for(config: TrainConfig) -> int:
    if config.device == "cpu":
        return 1
    return config.num_processes or max(1, visible_gpus())


def launch_command(config_file: Path, processes: int) -> list[str]:
    """One process per GPU; each runs the same config, and accelerate wires them together."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
            "-m", "facets.training.run", "--config", str(config_file), "--processes", str(processes)]


def prefect_progress():
    """A Trainer callback: progress as a Prefect artifact, one log line per logging step (main process)."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from transformers import TrainerCallback

    class PrefectProgress(TrainerCallback):
        artifact = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            shown = {k: v for k, v in logs.items() if k in ("loss", "learning_rate", "grad_norm")}
            get_run_logger().info("step %d/%d %s", state.global_step, state.max_steps, shown)
            percent = 100 * state.global_step / max(1, state.max_steps)
            if self.artifact is None:
                self.artifact = create_progress_artifact(percent, key="train-progress")
            else:
                update_progress_artifact(self.artifact, percent)

    return PrefectProgress()


@task(name="check-inputs", cache_policy=NO_CACHE)
def check(config: TrainConfig) -> TrainConfig:
    from facets.training.run import check_inputs, resolve_device

    checked = check_inputs(config)
    resolve_device(checked)
    return checked


@task(name="train-in-process", cache_policy=NO_CACHE)
def train_here(config: TrainConfig) -> dict:
    from facets.training.run import train

    return train(config, callbacks=[prefect_progress()]).model_dump(mode="json")


@task(name="train-accelerate", cache_policy=NO_CACHE)
def train_launched(config: TrainConfig, processes: int) -> dict:
    from facets.training.run import CONFIG_FILE, SUMMARY_FILE

    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config_file = output / f"launch_{CONFIG_FILE}"
    config_file.write_text(config.model_dump_json(indent=2))
    subprocess.run(launch_command(config_file, processes), check=True)
    return json.loads((output / SUMMARY_FILE).read_text())


def publish_artifacts(result: dict) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from facets.training.metrics import LOSS_CURVE_FILE, loss_points, read_metrics

    records = read_metrics(result["output_dir"])
    create_table_artifact([{"step": s, "loss": round(loss, 5)} for s, loss in loss_points(records)],
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


@flow(name="train", log_prints=True, persist_result=False)
def train(config: TrainConfig) -> dict:
    """Train on a release with the paper's recipe for the method, unless the config overrides it."""
    logger = get_run_logger()
    config = check(config)
    processes = processes_for(config)
    logger.info("%s on %s (%s) from %s -> %s, %d process(es)", config.method, config.release, config.subset,
                config.base_model, config.output_dir, processes)
    result = train_launched(config, processes) if processes > 1 else train_here(config)
    lengths = result["lengths"]
    if lengths["too_long"]:
        logger.warning("%d of %d rows were longer than %d tokens and left out", lengths["too_long"], lengths["rows"],
                       lengths["max_length"])
    publish_artifacts(result)
    logger.info("model saved to %s (%d steps, final loss %s)", result["output_dir"], result["steps"], result["final_loss"])
    return result
