"""TRL trainers for SFT, DPO, ORPO and the reward model from one resolved TrainConfig.

Precision (issue: updates that really happen): at lr 5e-6, and 5e-7 for DPO, a bf16 weight plus its
update rounds back to the same bf16 number for most weights. `fp32-master` keeps fp32 weights and
optimiser state and computes in bf16 (autocast); `bf16-stochastic` keeps bf16 weights with torchao's
8-bit AdamW rounding stochastically (unbiased, about 6 bytes a parameter: larger models fit).
"""
from __future__ import annotations

import os
from typing import Any

from facets.schemas.training import TrainConfig
from facets.training.sharding import fsdp_trainer, sharded_by_launcher

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental in TRL 1.x


def model_dtype(config: TrainConfig):
    import torch

    return torch.bfloat16 if config.precision == "bf16-stochastic" else torch.float32


def uses_bf16(config: TrainConfig) -> bool:
    return config.precision != "fp32"


def use_liger(config: TrainConfig, on_cpu: bool) -> bool:
    """Liger's Triton kernels need a GPU; by default they are used wherever they can be (not with DPO, whose
    reference log-probs are precomputed: TRL's Liger DPO loss cannot take them)."""
    if config.liger is not None:
        return config.liger
    if on_cpu or config.method == "dpo":
        return False
    from importlib.util import find_spec

    return find_spec("liger_kernel") is not None


def common_arguments(config: TrainConfig, on_cpu: bool, processes: int) -> dict[str, Any]:
    """TrainingArguments shared by the three methods."""
    if config.attn_implementation == "facets_varlen":
        from facets.training import attention  # noqa: F401 - registers the implementation with transformers
    checkpointing = (not on_cpu) if config.gradient_checkpointing is None else config.gradient_checkpointing
    if sharded_by_launcher():  # FSDP checkpoints each decoder layer itself (the launcher's flag says whether)
        checkpointing = False
    arguments: dict[str, Any] = dict(
        output_dir=config.output_dir,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        adam_beta2=config.adam_beta2,
        weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.accumulation_steps(processes),
        bf16=uses_bf16(config),
        gradient_checkpointing=checkpointing,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        use_liger_kernel=use_liger(config, on_cpu),
        use_cpu=on_cpu,
        dataloader_num_workers=0,
        # ORPO's old-style collator names no input the Trainer can count; its tokens come from the lengths
        include_num_input_tokens_seen="no" if config.method == "orpo" else "non_padding",
        model_init_kwargs={"dtype": model_dtype(config), "attn_implementation": config.attn_implementation},
    )
    if config.precision == "bf16-stochastic":
        arguments.update(optim="adamw_torch_8bit", optim_args="bf16_stochastic_round=True")
    return arguments


def build_trainer(config: TrainConfig, rows: Any, tokenizer: Any, *, on_cpu: bool, processes: int = 1,
                  callbacks: list | None = None):
    """The method's TRL trainer over `rows` (already formatted and length-filtered)."""
    arguments = common_arguments(config, on_cpu, processes)
    if config.method == "sft":
        from trl import SFTConfig, SFTTrainer

        # bfd packing turns padding-free on: a micro-batch is one row of whole samples with their bounds
        # (cu_seq_lens); facets_varlen (or sdpa's block-diagonal mask) keeps every sample to itself (tested)
        args = SFTConfig(**arguments, max_length=config.max_length, packing=config.packing, packing_strategy="bfd",
                         completion_only_loss=True, shuffle_dataset=True)
        return sharded(SFTTrainer)(model=config.base_model, args=args, train_dataset=rows, processing_class=tokenizer,
                          callbacks=callbacks)
    if config.method == "dpo":
        from trl import DPOConfig

        # reference log-probs computed once by the policy before training: one model in memory
        args = DPOConfig(**arguments, max_length=config.max_length, beta=config.beta, precompute_ref_log_probs=True,
                         precompute_ref_batch_size=max(1, config.batch_size * 2))
        return tokenised_dpo()(model=config.base_model, args=args, train_dataset=rows, processing_class=tokenizer,
                               callbacks=callbacks)
    if config.method == "rm":
        from trl import RewardConfig

        # rows come as whole chosen/rejected sequences ending in EOS: the value head reads the last token
        args = RewardConfig(**arguments, max_length=config.max_length)
        return sharded(RewardTrainer())(model=config.base_model, args=args, train_dataset=rows,
                                        processing_class=tokenizer, callbacks=callbacks)
    from trl.experimental.orpo import ORPOConfig

    args = ORPOConfig(**arguments, max_length=config.max_length, beta=config.beta)
    return tokenised_orpo()(model=config.base_model, args=args, train_dataset=rows, processing_class=tokenizer,
                            callbacks=callbacks)


def sharded(trainer_class: type) -> type:
    """The trainer itself, or its FSDP-sharding subclass when `accelerate launch` asked for FSDP."""
    return fsdp_trainer(trainer_class) if sharded_by_launcher() else trainer_class


def RewardTrainer():  # noqa: N802 - a class, imported late (TRL loads torch)
    from trl import RewardTrainer as TRLRewardTrainer

    return TRLRewardTrainer


# Rows come tokenised (training/data.py: a row's text never becomes a special token). SFT takes `input_ids`
# and `completion_mask` as they are; DPO and ORPO would tokenise from text again, so they take the ids here.
def tokenised_dpo():
    from trl import DPOTrainer

    class TokenisedDPOTrainer(sharded(DPOTrainer)):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:  # lengths were checked when the rows were made
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    return TokenisedDPOTrainer


def tokenised_orpo():
    from trl.experimental.orpo import ORPOTrainer

    class TokenisedORPOTrainer(sharded(ORPOTrainer)):
        def tokenize_row(self, feature, model=None) -> dict:
            if "prompt_ids" not in feature:
                return super().tokenize_row(feature, model)
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = feature[f"{side}_ids"]
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [-100] * len(prompt) + answer
            return row

    return TokenisedORPOTrainer
