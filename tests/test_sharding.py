"""Sharded training (FSDP2 through accelerate) on the CPU: two processes over gloo against one.

The same global batch of rows, in fp32, must give the same loss and the same updated weights whether one
process holds the whole model or two processes hold half of every parameter, gradient and optimiser
state each. The launched runs use the flow's own `accelerate launch` command and the shipped config."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the training extra (torch) is installed by `make test`")

from facets.training.launch import launch_command  # noqa: E402
from facets.schemas.training import TrainConfig  # noqa: E402
from facets.training.run import SUMMARY_FILE, check_inputs, train  # noqa: E402
from facets.training.sharding import DDP_CONFIG, FSDP_CONFIG, resolve_sharding  # noqa: E402
from training_fixtures import data_dir, model_dir  # noqa: E402, F401 (fixtures)


def config(data_dir: Path, model_dir: Path, output: Path, method: str = "sft", **overrides) -> TrainConfig:
    values = dict(method=method, release=str(data_dir), output_dir=str(output), base_model=str(model_dir),
                  device="cpu", max_steps=2, max_length=512, batch_size=2, global_batch_size=2, logging_steps=1,
                  warmup_steps=0, save_steps=100, precision="fp32", learning_rate=1e-3, lr_scheduler="constant",
                  sharding="none")
    return TrainConfig(**{**values, **overrides})


def launch(cfg: TrainConfig, processes: int = 2, **popen) -> subprocess.Popen:
    """The flow's `accelerate launch` of a run, as its train-accelerate task starts it."""
    cfg = check_inputs(cfg)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    config_file = Path(cfg.output_dir) / "launch_train_config.json"
    config_file.write_text(cfg.model_dump_json())
    return subprocess.Popen(launch_command(cfg, config_file, processes), **popen)


def launched(cfg: TrainConfig, processes: int = 2) -> dict:
    process = launch(cfg, processes, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-4000:]
    return json.loads((Path(cfg.output_dir) / SUMMARY_FILE).read_text())


def losses(output: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: m["loss"] for m in lines if "loss" in m}


def weights(output: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(output / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_two_sharded_processes_train_as_one_on_the_same_global_batch(method, data_dir, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    one = train(config(data_dir, model_dir, tmp_path / "one", method))
    two = launched(config(data_dir, model_dir, tmp_path / "two", method, batch_size=1, sharding="fsdp",
                          num_processes=2))
    assert two["steps"] == one.steps == 2 and two["config"]["sharding"] == "fsdp"
    assert list(Path(tmp_path / "two" / "checkpoint-2").glob("pytorch_model_fsdp_0/*.distcp")), "sharded checkpoint"

    one_losses, two_losses = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one_losses.keys() == two_losses.keys() == {1, 2}
    for step in one_losses:
        assert two_losses[step] == pytest.approx(one_losses[step], rel=1e-5), (step, one_losses, two_losses)

    start, after_one, after_two = weights(model_dir), weights(tmp_path / "one"), weights(tmp_path / "two")
    assert after_one.keys() == after_two.keys()
    moved = torch.cat([(after_one[k] - start[k]).abs().flatten() for k in start])
    apart = torch.cat([(after_one[k] - after_two[k]).abs().flatten() for k in start])
    assert moved.max() > 1e-3 and (moved > 1e-5).float().mean() > 0.5, "the steps moved the weights"
    # AdamW divides by sqrt(v) + 1e-8: a weight whose gradient is near zero (an embedding row the batch barely
    # uses) turns the last-bit differences of another summation order into a visible share of a step (lr 1e-3)
    assert (apart > 1e-6).float().mean() < 0.005, f"{int((apart > 1e-6).sum())} of {apart.numel()} weights differ"
    assert apart.max() < 0.1 * 1e-3, f"one process and two sharded ones differ by {apart.max()}"

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # the consolidated Hugging Face model
    assert torch.equal(reloaded.state_dict()["model.embed_tokens.weight"], after_two["model.embed_tokens.weight"])


def kill_with_workers(pid: int) -> None:
    """SIGKILL to the launcher and the training processes it started (each in a session of its own)."""
    import psutil

    launcher = psutil.Process(pid)
    processes = [*launcher.children(recursive=True), launcher]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_from_its_sharded_checkpoint(data_dir, model_dir, tmp_path):
    cfg = config(data_dir, model_dir, tmp_path, batch_size=1, sharding="fsdp", num_processes=2, max_steps=40,
                 save_steps=2, learning_rate=1e-4)
    run = launch(cfg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoint-4" / "trainer_state.json").is_file():
        assert run.poll() is None and time.monotonic() < deadline, "the run ended before its 4th step was saved"
        time.sleep(0.2)
    kill_with_workers(run.pid)  # as a lost machine: the launcher and both training processes at once, mid-way
    run.wait()
    assert not (tmp_path / SUMMARY_FILE).exists()
    killed_at = max(losses(tmp_path))
    assert killed_at < 40

    result = launched(cfg)
    assert result["steps"] == 40
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert logged.count(1) == 1, "the rerun did not start from scratch"
    resumed_at = logged[killed_at] - 1  # the step of the checkpoint the rerun started from
    assert resumed_at >= 4 and resumed_at % 2 == 0 and logged[killed_at:] == list(range(resumed_at + 1, 41))


def test_auto_shards_only_when_one_gpu_s_copy_does_not_fit(data_dir, tmp_path):
    from facets.schemas.training import BASE_MODEL

    paper = TrainConfig(method="sft", release=str(data_dir), output_dir=str(tmp_path), base_model=BASE_MODEL).resolved()
    sharded, memory = resolve_sharding(paper, processes=4, gpu_memory_gib=80)
    assert sharded.sharding == "fsdp" and memory.fits
    alone, memory = resolve_sharding(paper, processes=1, gpu_memory_gib=80)
    assert alone.sharding == "none" and not memory.fits, "one GPU: nothing to shard over; the plan says so"
    small = paper.model_copy(update={"max_length": 512})
    assert resolve_sharding(small, processes=4, gpu_memory_gib=1000)[0].sharding == "none"
    assert resolve_sharding(paper.model_copy(update={"sharding": "none"}), 4, 80)[0].sharding == "none"


def test_the_flow_launches_the_shipped_accelerate_configs(data_dir, model_dir, tmp_path):
    import yaml

    sharded = config(data_dir, model_dir, tmp_path, sharding="fsdp", precision="fp32-master", cpu_offload=True)
    command = launch_command(sharded, tmp_path / "c.json", 4)
    assert command[command.index("--config_file") + 1] == str(FSDP_CONFIG)
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--mixed_precision") + 1] == "bf16"
    assert command[command.index("--fsdp_offload_params") + 1] == "true"
    plain = launch_command(config(data_dir, model_dir, tmp_path), tmp_path / "c.json", 2)
    assert plain[plain.index("--config_file") + 1] == str(DDP_CONFIG) and "--fsdp_offload_params" not in plain
    fsdp = yaml.safe_load(FSDP_CONFIG.read_text())
    assert fsdp["distributed_type"] == "FSDP" and fsdp["fsdp_config"]["fsdp_version"] == 2
    assert fsdp["fsdp_config"]["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_config"]["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
