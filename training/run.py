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
    release = resolve_release(config.release)
    check_layout(subset_files(release, config.subset), config.method)
    check_base_model(config.base_model)
    if config.precision == "bf16-stochastic":
        try:
            import torchao  # noqa: F401
        except ImportError as error:
            raise TrainingInputError("precision bf16-stochastic needs torchao (pip install torchao)") from error
    return config.model_copy(update={"release": str(release)})


def load_tokenizer(base_model: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:  # Mistral's tokenizer has none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def last_checkpoint(config: TrainConfig) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    output = Path(config.output_dir)
    return get_last_checkpoint(str(output)) if config.resume and output.is_dir() else None


def train(config: TrainConfig, callbacks: list | None = None, processes: int = 1) -> TrainResult:
    """Runs one method on one release subset and saves the model, its tokenizer and the metrics."""
    from facets.training.metrics import LOSS_CURVE_FILE, MetricsFile, plot_loss_curve, read_metrics
    from facets.training.trainers import build_trainer

    config = check_inputs(config)
    on_cpu = resolve_device(config) == "cpu"
    tokenizer = load_tokenizer(config.base_model)
    rows, lengths = load_rows(config, tokenizer)
    output = Path(config.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / CONFIG_FILE).write_text(config.model_dump_json(indent=2))
    trainer = build_trainer(config, rows, tokenizer, on_cpu=on_cpu, processes=processes,
                            callbacks=[MetricsFile(config.output_dir), *(callbacks or [])])
    started = time.monotonic()
    outcome = trainer.train(resume_from_checkpoint=last_checkpoint(config))
    seconds = time.monotonic() - started
    save(trainer, tokenizer, config)
    records = read_metrics(output)
    plot_loss_curve(records, output / LOSS_CURVE_FILE, f"{config.method} on {Path(config.release).name}/{config.subset}")
    losses = [r["loss"] for r in records if "loss" in r]
    tokens = int(trainer.state.num_input_tokens_seen or 0) or estimated_tokens(trainer, lengths)
    result = TrainResult(output_dir=str(output), method=config.method, release=config.release,
                         steps=trainer.state.global_step, final_loss=losses[-1] if losses else outcome.training_loss,
                         seconds=round(seconds, 2), tokens_seen=tokens,
                         tokens_per_second=round(tokens / seconds, 1) if seconds else 0.0,
                         lengths=lengths.as_dict(), config=config.model_dump(mode="json"))
    if trainer.is_world_process_zero():
        (output / SUMMARY_FILE).write_text(result.model_dump_json(indent=2))
    return result


def estimated_tokens(trainer: Any, lengths: Any) -> int:
    """Rows seen times their mean length, for trainers that do not count tokens themselves."""
    rows_seen = trainer.state.global_step * trainer.args.gradient_accumulation_steps * trainer.args.train_batch_size
    return int(rows_seen * lengths.tokens / max(1, lengths.kept))


def save(trainer: Any, tokenizer: Any, config: TrainConfig) -> None:
    """The final model in bf16 (as the base models ship) unless the run was fp32 throughout."""
    import torch

    if config.precision != "fp32":
        trainer.model.to(torch.bfloat16)
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)


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
