"""`facets train`: SFT, DPO, ORPO or the reward model on a release with the paper's recipe, through the `train` flow.

    facets train --release data --method sft --base-model mistral-community/Mistral-7B-v0.2 --output models/sft
    facets train --release data --method dpo --base-model models/sft-small --output models/dpo
    facets train --release data --method rm --base-model models/sft-1epoch --output models/rm
    facets train --release data --method sft --base-model ./tiny --output /tmp/t --device cpu --max-steps 3

Flags left out take the method's recipe (schemas/training.py); `--config FILE` gives the whole TrainConfig
(JSON or YAML) and flags override it. Bad inputs are reported before any model is loaded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pydantic import ValidationError

from facets.flows.commands.config_file import config_problem, read_config_file

# flag -> TrainConfig field, for the overrides a user types most
OVERRIDES = {"epochs": "epochs", "max_steps": "max_steps", "lr": "learning_rate", "batch_size": "batch_size",
             "global_batch_size": "global_batch_size", "max_length": "max_length", "device": "device",
             "subset": "subset", "prompt_format": "prompt_format", "precision": "precision", "beta": "beta",
             "attention": "attn_implementation", "processes": "num_processes", "save_steps": "save_steps",
             "seed": "seed", "sharding": "sharding", "cpu_offload": "cpu_offload"}


def configure(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--release", help="a release folder, or a data dir / releases/ folder whose LATEST names one")
    add("--method", choices=["sft", "dpo", "orpo", "rm"])
    add("--base-model", help="hub id or local folder (default: Mistral-7B-v0.2; DPO has no default: the SFT "
                             "model trained on `small`)")
    add("--output", dest="output_dir", help="where checkpoints, the model, metrics and the loss curve go")
    add("--config", type=Path, help="a TrainConfig as JSON or YAML; flags override it")
    add("--epochs", type=float)
    add("--max-steps", type=int)
    add("--lr", type=float, help="learning rate")
    add("--batch-size", type=int, help="rows per device per forward pass")
    add("--global-batch-size", type=int, help="rows per optimiser step (gradient accumulation fills the gap)")
    add("--max-length", type=int, help="tokens per row; longer rows are left out and counted")
    add("--device", choices=["auto", "cuda", "cpu"])
    add("--subset", help="release subset (sft or small for SFT; dpo; orpo)")
    add("--prompt-format", choices=["mistral", "chat"])
    add("--precision", choices=["fp32-master", "bf16-stochastic", "fp32"])
    add("--beta", type=float, help="DPO beta / ORPO alpha")
    add("--attention", help="attention implementation (facets_varlen, sdpa, flex_attention, eager)")
    add("--processes", type=int, help="GPUs to use; more than one runs accelerate launch")
    add("--save-steps", type=int)
    add("--seed", type=int)
    add("--sharding", choices=["auto", "none", "fsdp"],
        help="fsdp: shard weights, gradients and optimiser states over the GPUs (FSDP2); auto: when the memory "
             "plan says one GPU's copy does not fit")
    add("--cpu-offload", action="store_true", default=None, help="with fsdp: keep the sharded state in CPU memory")
    add("--general-pairs", action="append", metavar="NAME=DATASET",
        help="RM stage 2: train on general pairs instead of the release (hh-rlhf, oasst1, webgpt; hub id or local copy)")
    add("--no-packing", dest="packing", action="store_false", default=None, help="SFT without packing")
    add("--no-resume", dest="resume", action="store_false", default=None, help="start over, ignoring checkpoints")


def config_from(args: argparse.Namespace):
    from facets.schemas.training import TrainConfig

    values = read_config_file(args.config)
    for name in ("release", "method", "base_model", "output_dir", "packing", "resume"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    for flag, field in OVERRIDES.items():
        if getattr(args, flag) is not None:
            values[field] = getattr(args, flag)
    if args.general_pairs:
        values["general_pairs"] = dict(_named(item) for item in args.general_pairs)
    missing = [f"--{n.replace('_dir', '').replace('_', '-')}" for n in ("release", "method", "output_dir")
               if n not in values]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give them in --config)")
    return TrainConfig.model_validate(values)


def _named(item: str) -> tuple[str, str]:
    name, sep, location = item.partition("=")
    if not sep or not name or not location:
        raise ValueError(f"--general-pairs takes NAME=DATASET, not {item!r}")
    return name, location


def run(args: argparse.Namespace) -> int:
    quiet_prefect()
    from facets.training.data import TrainingInputError

    try:
        config = config_from(args)
    except (ValueError, ValidationError, OSError) as error:
        return fail(config_problem(error, args.config))
    try:
        preflight(config)
    except TrainingInputError as error:
        return fail(str(error))
    from facets.flows.train import train

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_WithoutTraceback())
    try:
        result = train(config)
    except TrainingInputError as error:
        return fail(str(error))
    except OSError as error:  # transformers' word for a model it cannot load (hub unreachable, files missing)
        return fail(f"{_first_line(error)} (base model: {config.resolved().base_model})")
    lengths = result["lengths"]
    if result.get("already_trained"):
        print(f"{result['method']} already trained in {result['output_dir']}: {result['steps']} steps, final loss "
              f"{result['final_loss']}; nothing to do (a larger --max-steps goes on, --no-resume starts over)")
        return 0
    print(f"{result['method']} done: {result['steps']} steps, final loss {result['final_loss']}, "
          f"{result['tokens_per_second']:.0f} tokens/s; {lengths['kept']} rows trained, "
          f"{lengths['too_long']} longer than {lengths['max_length']} tokens left out")
    if result.get("evaluation"):
        evaluation = result["evaluation"]
        print(f"reward model accuracy on the rm test split: {evaluation['accuracy']} ({evaluation['pairs']} pairs)")
    print(f"model: {result['output_dir']}  (beside it: train_summary.json, metrics.jsonl, loss_curve.png)")
    return 0


def quiet_prefect() -> None:
    """Before Prefect is imported: no telemetry (it needs the network, and its errors fill the screen offline)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def fail(message: str) -> int:
    print(f"facets train: error: {message}", file=sys.stderr)
    return 2


def preflight(config) -> None:
    """The flow's own input checks, here before Prefect starts: a bad input costs no server start and no
    traceback. A hub id that is neither cached nor reachable is refused at once rather than after the
    minute of retries `from_pretrained` spends offline."""
    from facets.training.run import check_inputs, resolve_device

    checked = check_inputs(config)
    resolve_device(checked)
    check_hub_model(checked.base_model)


def check_hub_model(base_model: str) -> None:
    from facets.training.data import TrainingInputError

    if Path(base_model).expanduser().exists() or _cached_on_hub(base_model):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise TrainingInputError(f"base model {base_model} is not a local folder nor in the Hugging Face cache; "
                                 "and HF_HUB_OFFLINE is set: download it first or pass a local folder")
    import huggingface_hub
    from huggingface_hub.utils import HfHubHTTPError, HFValidationError

    try:
        huggingface_hub.model_info(base_model, timeout=10)
    except HFValidationError:
        raise TrainingInputError(f"base model {base_model} is neither a local folder nor a hub id") from None
    except HfHubHTTPError as error:  # the hub answered: no such model, or no access to it
        raise TrainingInputError(f"base model {base_model} could not be loaded from the hub: "
                                 f"{_first_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - connection errors come as several types (requests, httpx, OSError)
        raise TrainingInputError(f"base model {base_model} is not a local folder nor in the Hugging Face cache; "
                                 f"and the hub cannot be reached ({type(error).__name__}): pass a local folder, "
                                 "or download it where the hub is reachable") from None


def _cached_on_hub(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class _WithoutTraceback(logging.Filter):
    """Prefect logs a failed run with its traceback; the command prints the one-line cause instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True
