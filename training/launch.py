"""Where a training run goes: how many processes, and the `accelerate launch` command that starts them with
the shipped config (FSDP2 or data parallel); the launcher stopped with every worker it started."""
from __future__ import annotations

import subprocess
from pathlib import Path

from facets.schemas.training import TrainConfig


def visible_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def processes_for(config: TrainConfig) -> int:
    """One per GPU by default; on the CPU one, unless num_processes asks for more (gloo: tests of sharding)."""
    if config.device == "cpu":
        return config.num_processes or 1
    return config.num_processes or max(1, visible_gpus())


def gpu_memory_gib() -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def launch_command(config: TrainConfig, config_file: Path, processes: int) -> list[str]:
    """One process per GPU with the shipped accelerate config (FSDP2 or data parallel); each runs the same
    config, and accelerate wires them together."""
    from facets.training.sharding import launch_command as accelerate_launch

    checkpointing = config.device != "cpu" if config.gradient_checkpointing is None else config.gradient_checkpointing
    return accelerate_launch(config_file, processes, sharded=config.sharding == "fsdp",
                             mixed_precision="no" if config.precision == "fp32" else "bf16",
                             activation_checkpointing=checkpointing, cpu_offload=config.cpu_offload,
                             port=free_port())


def free_port() -> int:
    """A port for the processes to meet on: accelerate's fixed default clashes with any other run on the host."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_with_workers(launcher: subprocess.Popen) -> None:
    """The launcher and the processes it started: torch's launcher puts each worker in a session of its own,
    so they would outlive a launcher that is killed (a cancelled run, a worker shutting down)."""
    if launcher.poll() is not None:
        return
    import psutil

    try:
        processes = [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=30)
    for process in alive:
        process.kill()
