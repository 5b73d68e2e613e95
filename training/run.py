"""One training run: check the inputs, load the rows, train with TRL, save, and summarise.

Everything that can be wrong with the inputs (release, layout, base model path, device, lengths) is
found before the model is loaded. `python -m facets.training.run --config FILE` is what
`accelerate launch` runs on each GPU when the flow spreads a run over several.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from facets.schemas.training import TrainConfig
from facets.training.data import (TrainingInputError, check_base_model, check_layout, load_rows, resolve_release,
                                  subset_files)

SUMMARY_FILE = "train_summary.json"
CONFIG_FILE = "train_config.json"
NO_DPO_START = ("DPO starts from the SFT model trained on `small` (Janus*), never silently from the base model: "
                "pass --base-model FOLDER of that model (facets train --method sft --subset small --output FOLDER)")
# what a rerun may change and still be the same run: how long, how often it saves and logs, and where it runs
RERUN_MAY_CHANGE = {"max_steps", "epochs", "save_steps", "save_total_limit", "logging_steps", "resume",
                    "num_processes", "device", "sharding", "cpu_offload", "batch_size", "liger",
                    "attn_implementation", "gradient_checkpointing"}


class TrainResult(BaseModel):
    output_dir: str
    method: str
    release: str
    steps: int
    final_loss: float | None
    seconds: float
    tokens_seen: int
    tokens_per_second: float
    lengths: dict
    config: dict
    already_trained: bool = False  # the run had finished before: nothing was trained this time
    evaluation: dict | None = None  # the reward model: accuracy on the release's rm test split


def resolve_device(config: TrainConfig) -> str:
    """The GPU when one is visible; the CPU only when asked for (a real run there would take days)."""
    import torch

    if config.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if config.device == "cuda":
        raise TrainingInputError("--device cuda, but no GPU is visible to torch (check CUDA_VISIBLE_DEVICES)")
    raise TrainingInputError("no GPU is visible: training at the paper's settings needs one; "
                             "pass --device cpu to run on the CPU anyway (small models, smoke runs)")


def check_inputs(config: TrainConfig) -> TrainConfig:
    """Every check that needs no model; returns the config with the recipe filled in and the release resolved."""
    config = config.resolved()
    if config.base_model is None:
        raise TrainingInputError(NO_DPO_START)
    release = resolve_release(config.release)
    check_layout(subset_files(release, config.subset), config.method)
    if config.method == "rm":  # judged on the release's test split after training: found before, not after
        check_layout(subset_files(release, config.subset, "test"), config.method)
    check_base_model(config.base_model)
    if config.precision == "bf16-stochastic":
        try:
            import torchao  # noqa: F401
        except ImportError as error:
            raise TrainingInputError("precision bf16-stochastic needs torchao (pip install torchao)") from error
    return config.model_copy(update={"release": str(release)})


def load_tokenizer(base_model: str, method: str = "sft") -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:  # Mistral's tokenizer has none; padding is masked out anyway
        # but a reward model finds its last token as the last one that is not padding: that must be the EOS
        tokenizer.pad_token = tokenizer.unk_token if method == "rm" and tokenizer.unk_token else tokenizer.eos_token
    return tokenizer


def last_checkpoint(config: TrainConfig) -> str | None:
    """The newest complete checkpoint: one that a kill cut short (no trainer_state.json, the last file the
    Trainer writes) is passed over for the one before it."""
    output = Path(config.output_dir)
    if not config.resume or not output.is_dir():
        return None
    steps = sorted((int(p.name.split("-")[1]), p) for p in output.glob("checkpoint-*")
                   if p.is_dir() and p.name.split("-")[1].isdigit())
    complete = [p for _, p in steps if (p / "trainer_state.json").is_file()]
    return str(complete[-1]) if complete else None


def finished_run(config: TrainConfig) -> TrainResult | None:
    """The summary of the run already finished in `config.output_dir`, when it trained as far as `config`
    asks (its steps, or its epochs); None when there is none or it should go on. A rerun never trains past a
    finished run's last step; a larger --max-steps (or more epochs) goes on from its last checkpoint."""
    summary_file = Path(config.output_dir) / SUMMARY_FILE
    if not config.resume or not summary_file.is_file():
        return None
    done = TrainResult.model_validate_json(summary_file.read_text())
    earlier = TrainConfig.model_validate(done.config)
    changed = sorted(name for name in TrainConfig.model_fields
                     if name not in RERUN_MAY_CHANGE and getattr(earlier, name) != getattr(config, name))
    if changed:
        raise TrainingInputError(
            f"{config.output_dir} holds a finished run with another {', '.join(changed)}: "
            "pass another --output, or --no-resume to train over it")
    if config.max_steps > 0:
        finished = done.steps >= config.max_steps
    else:
        finished = earlier.max_steps <= 0 and (earlier.epochs or 0) >= (config.epochs or 0)
    return done.model_copy(update={"already_trained": True}) if finished else None


def train(config: TrainConfig, callbacks: list | None = None, processes: int = 1) -> TrainResult:
    """Runs one method on one release subset and saves the model, its tokenizer and the metrics; a run
    already finished in the output folder is returned as it is (`finished_run`)."""
    from facets.training.metrics import LOSS_CURVE_FILE, METRICS_FILE, MetricsFile, plot_loss_curve, read_metrics

    config = check_inputs(config)
    done = finished_run(config)
    if done is not None:
        return done
    from facets.training.metrics import LogEveryFewSteps, final_loss, rounded
    from facets.training.trainers import build_trainer

    on_cpu = resolve_device(config) == "cpu"
    tokenizer = load_tokenizer(config.base_model, config.method)
    rows, lengths = load_rows(config, tokenizer)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    trainer = build_trainer(config, rows, tokenizer, on_cpu=on_cpu, processes=processes,
                            callbacks=[MetricsFile(config.output_dir), LogEveryFewSteps(), *(callbacks or [])])
    resume_from = last_checkpoint(config)
    if resume_from is None:  # a run from scratch: no curve of an earlier one mixed into its own
        (output / METRICS_FILE).unlink(missing_ok=True)
    started = time.monotonic()
    outcome = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.monotonic() - started
    evaluation = reward_accuracy(trainer, tokenizer, config) if config.method == "rm" else None
    save(trainer, tokenizer, config)
    records = read_metrics(output)
    plot_loss_curve(records, output / LOSS_CURVE_FILE, f"{config.method} on {Path(config.release).name}/{config.subset}")
    last_logged = final_loss(records)
    tokens = int(trainer.state.num_input_tokens_seen or 0) or estimated_tokens(trainer, lengths)
    if last_logged is None:
        last_logged = rounded(outcome.training_loss)
    result = TrainResult(output_dir=str(output), method=config.method, release=config.release,
                         steps=trainer.state.global_step, final_loss=last_logged,
                         seconds=round(seconds, 2), tokens_seen=tokens,
                         tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0,
                         lengths=lengths.as_dict(), config=config.model_dump(mode="json"), evaluation=evaluation)
    if trainer.is_world_process_zero():
        (output / SUMMARY_FILE).write_text(result.model_dump_json(indent=2))
    return result


def reward_accuracy(trainer: Any, tokenizer: Any, config: TrainConfig) -> dict:
    """How often the reward model scores the chosen answer above the rejected one on the rm test split
    (one pair per batch, so the mean of the batches' accuracies is the accuracy)."""
    test, lengths = load_rows(config, tokenizer, split="test")
    trainer.args.per_device_eval_batch_size = 1
    metrics = trainer.evaluate(eval_dataset=test)  # TRL adds its reward metrics as eval_*
    return {"split": "test", "pairs": lengths.kept, "too_long": lengths.too_long,
            "accuracy": round(float(metrics["eval_accuracy"]), 4), "margin": round(float(metrics["eval_margin"]), 4)}


def estimated_tokens(trainer: Any, lengths: Any) -> int:
    """Rows seen times their mean length, for trainers that do not count tokens themselves."""
    rows_seen = trainer.state.global_step * trainer.args.gradient_accumulation_steps * trainer.args.train_batch_size
    return int(rows_seen * lengths.tokens / max(1, lengths.kept))


def save(trainer: Any, tokenizer: Any, config: TrainConfig) -> None:
    """The final model in bf16 (as the base models ship) unless the run was fp32 throughout; a sharded run's
    shards are gathered into one Hugging Face model (its checkpoints stay sharded, one file per process)."""
    import torch

    if getattr(trainer, "is_fsdp_enabled", False):
        state = consolidated_state(trainer, torch.float32 if config.precision == "fp32" else torch.bfloat16)
        if trainer.is_world_process_zero():
            trainer.accelerator.unwrap_model(trainer.model).save_pretrained(config.output_dir, state_dict=state)
        trainer.accelerator.wait_for_everyone()
    else:
        if config.precision != "fp32":
            trainer.model.to(torch.bfloat16)
        trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)


def consolidated_state(trainer: Any, dtype: Any) -> dict:
    """The sharded model's whole state dict on the main process (empty elsewhere), gathered one tensor at a
    time so no GPU ever holds more than one whole tensor beyond its shard; every process must call it."""
    from torch.distributed.tensor import DTensor

    main = trainer.is_world_process_zero()
    state = {}
    for name, value in trainer.model.state_dict().items():
        whole = value.full_tensor() if isinstance(value, DTensor) else value  # a collective: same order everywhere
        if main:
            state[name] = whole.detach().to("cpu", dtype if whole.is_floating_point() else whole.dtype).clone()
        del whole
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="One training run from a TrainConfig JSON file (used by accelerate launch)")
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    result = train(TrainConfig.model_validate(json.loads(args.config.read_text())), processes=args.processes)
    print(result.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
