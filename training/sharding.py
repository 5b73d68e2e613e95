"""Sharded training: FSDP2 full shard through accelerate (docs/ARCHITECTURE.md, decision 22).

The flow runs `accelerate launch` with a config shipped beside this module (accelerate/fsdp2.yaml, or
accelerate/ddp.yaml for plain data parallel); every process runs `python -m facets.training.run`, whose
Trainer builds its Accelerator from what the launcher put in the environment. accelerate then shards
each decoder layer with `fully_shard`, keeps the trained weights in fp32 and computes in bf16.

Two things are set here rather than in the YAML:
- gradients are reduced in fp32 (accelerate's bf16 policy would reduce them in bf16, and at lr 5e-7 the
  rounding of a sum of bf16 gradients is as large as the signal);
- on the CPU (tests, gloo), accelerate leaves FSDP off whatever the config says; the same plugin is put
  on the state by hand, so the CPU runs the same `fully_shard` code path as the GPUs.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ACCELERATE_CONFIGS = Path(__file__).parent / "accelerate"
FSDP_CONFIG = ACCELERATE_CONFIGS / "fsdp2.yaml"
DDP_CONFIG = ACCELERATE_CONFIGS / "ddp.yaml"


def launch_command(config_file: Path, processes: int, *, sharded: bool, mixed_precision: str,
                   activation_checkpointing: bool, cpu_offload: bool, port: int | None = None) -> list[str]:
    """`accelerate launch` of one training run over `processes` processes, with the shipped config."""
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(FSDP_CONFIG if sharded else DDP_CONFIG),
               "--num_processes", str(processes), "--mixed_precision", mixed_precision]
    if port is not None:
        command += ["--main_process_port", str(port)]
    if sharded:
        command += ["--fsdp_activation_checkpointing", str(activation_checkpointing).lower(),
                    "--fsdp_offload_params", str(cpu_offload).lower()]
    return command + ["-m", "facets.training.run", "--config", str(config_file), "--processes", str(processes)]


def sharded_by_launcher() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_trainer(trainer_class: type) -> type:
    """`trainer_class` whose Accelerator shards as the launcher asked, on the CPU too, reducing in fp32."""

    class Sharded(trainer_class):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            if not sharded_by_launcher():
                return
            state = self.accelerator.state
            if getattr(state, "fsdp_plugin", None) is None:  # the CPU: accelerate enables FSDP only on accelerators
                from accelerate.state import PartialState
                from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

                state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launcher's environment
                # both shared states, as accelerate does on a GPU: a later AcceleratorState() copies the partial one
                state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                self.is_fsdp_enabled = True
            _reduce_in_fp32(state.fsdp_plugin, self.accelerator.mixed_precision)

    Sharded.__name__ = Sharded.__qualname__ = f"Sharded{trainer_class.__name__}"
    return Sharded


def _reduce_in_fp32(plugin, mixed_precision: str) -> None:
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32,
                                                         output_dtype=None, cast_forward_inputs=True)


def resolve_sharding(config, processes: int, gpu_memory_gib: float | None):
    """(config with sharding none or fsdp, the memory plan of that choice or None). auto shards when several
    processes run and one GPU's whole copy does not fit, or when CPU offload is asked for."""
    from facets.training.memory_plan import plan_for

    choice = config.sharding
    if choice == "auto":
        whole = plan_for(config, processes, gpu_memory_gib, sharding="none")
        needs = config.cpu_offload or (processes > 1 and whole is not None and not whole.fits)
        choice = "fsdp" if needs else "none"
    resolved = config.model_copy(update={"sharding": choice})
    return resolved, plan_for(resolved, processes, gpu_memory_gib)
