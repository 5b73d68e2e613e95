"""Configuration of a training run: the paper's recipe per method (docs/ARCHITECTURE.md) unless a field overrides it."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["sft", "dpo", "orpo", "rm"]
BASE_MODEL = "mistral-community/Mistral-7B-v0.2"


class Recipe(BaseModel):
    """The published Janus settings of one method (the axolotl configs of the Janus repository)."""

    model_config = ConfigDict(frozen=True)

    subset: str
    epochs: float
    learning_rate: float
    max_length: int
    global_batch_size: int
    packing: bool
    beta: float | None = None
    warmup: float = 10  # optimiser steps, or below 1 a fraction of them
    adam_beta2: float = 0.999


RECIPES: dict[str, Recipe] = {
    # SFT: 4 epochs at 5e-6, packed 8192-token rows, 32 packed rows per step (2 per GPU x 4 GPUs x 4 accumulated)
    "sft": Recipe(subset="sft", epochs=4, learning_rate=5e-6, max_length=8192, global_batch_size=32, packing=True),
    # DPO: from the SFT model trained on `small`; 16 pairs per step, beta is TRL's default as the paper left it
    "dpo": Recipe(subset="dpo", epochs=2, learning_rate=5e-7, max_length=2048, global_batch_size=16, packing=False,
                  beta=0.1),
    # ORPO: from the base model; the paper's orpo_alpha is TRL's `beta`
    "orpo": Recipe(subset="orpo", epochs=2, learning_rate=5e-6, max_length=4096, global_batch_size=16, packing=False,
                   beta=0.1),
    # RM (OpenRLHF train_rm.py in the paper): Bradley-Terry loss, value head on the last token; 1 epoch per stage at
    # 9e-6, 128 pairs per step, cosine with 3 % warmup, Adam betas (0.9, 0.95); from Janus trained 1 epoch on `sft`
    "rm": Recipe(subset="rm", epochs=1, learning_rate=9e-6, max_length=2048, global_batch_size=128, packing=False,
                 warmup=0.03, adam_beta2=0.95),
}
SUBSETS_OF: dict[str, tuple[str, ...]] = {"sft": ("sft", "small"), "dpo": ("dpo",), "orpo": ("orpo", "dpo"),
                                          "rm": ("rm",)}
# stage 2 of the reward model: general helpfulness pairs, mixed 0.72 : 0.14 : 0.14, at most 66,000 (the paper's)
GENERAL_PAIR_SHARES = {"hh-rlhf": 0.72, "oasst1": 0.14, "webgpt": 0.14}
GENERAL_PAIRS_MAX = 66_000


class TrainConfig(BaseModel):
    """One training run. Unset fields take the method's recipe; `resolved()` fills them in."""

    model_config = ConfigDict(extra="forbid")

    method: Method
    release: str = Field(description="a release folder (releases/<version>), or a folder whose LATEST names one")
    output_dir: str
    base_model: str | None = Field(
        None, description=f"a hub id or a local model folder; default {BASE_MODEL}, but DPO has none: it starts "
                          "from the SFT model trained on `small` and must be given it")
    subset: str | None = Field(None, description="release subset; default sft, dpo or orpo after the method")
    prompt_format: Literal["mistral", "chat"] = Field(
        "mistral", description="mistral: [INST] {system}\\n{prompt} [/INST]; chat: the tokenizer's chat template")
    epochs: float | None = Field(None, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimiser steps (-1: run the epochs)")
    learning_rate: float | None = Field(None, gt=0)
    warmup_steps: float | None = Field(None, ge=0, description="optimiser steps of warmup, or below 1 a fraction "
                                                                 "of all steps; default the recipe's (10, RM 3 %)")
    adam_beta2: float | None = Field(None, gt=0, lt=1, description="default the recipe's (0.999, RM 0.95)")
    lr_scheduler: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    beta: float | None = Field(None, gt=0, description="DPO beta / ORPO alpha")
    max_length: int | None = Field(None, gt=0, description="tokens per row (SFT: per packed row)")
    packing: bool | None = Field(None, description="SFT only: pack rows into max_length, each attending only to itself")
    batch_size: int = Field(1, gt=0, description="rows per device per forward pass")
    global_batch_size: int | None = Field(None, gt=0, description="rows per optimiser step, all devices together")
    precision: Literal["fp32-master", "bf16-stochastic", "fp32"] = Field(
        "fp32-master",
        description="fp32-master: fp32 weights and optimiser, bf16 compute; bf16-stochastic: bf16 weights and an "
                    "8-bit AdamW with stochastic rounding (torchao; fits larger models); fp32: no bf16 at all")
    attn_implementation: str | None = Field(
        None, description="default: facets_varlen for SFT (each packed sample attends only to itself, through a "
                          "varlen flash kernel on a GPU), sdpa for DPO and ORPO; or sdpa, flex_attention, eager")
    liger: bool | None = Field(None, description="Liger's fused kernels (RMSNorm, RoPE, SwiGLU, linear+loss); "
                                                 "default: on when liger-kernel is installed and a GPU is used")
    gradient_checkpointing: bool | None = Field(None, description="default: on for a GPU, off on the CPU")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: the GPU; the CPU only when asked")
    seed: int = 0
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(500, gt=0, description="a checkpoint every N steps; a rerun resumes from the last one")
    save_total_limit: int = Field(2, gt=0)
    general_pairs: dict[str, str] | None = Field(
        None, description="RM stage 2: train on general helpfulness pairs instead of the release, from these "
                          "datasets (hub ids or local copies) keyed hh-rlhf, oasst1, webgpt")
    max_general_pairs: int = Field(GENERAL_PAIRS_MAX, gt=0)
    resume: bool = Field(True, description="resume from the last checkpoint in output_dir when there is one")
    num_processes: int | None = Field(None, gt=0, description="GPUs to use; more than 1 runs `accelerate launch`")
    sharding: Literal["auto", "none", "fsdp"] = Field(
        "auto", description="fsdp: FSDP2 full shard of weights, gradients and optimiser states over the processes; "
                            "none: every process holds the whole model (data parallel); auto: fsdp when the memory "
                            "plan says one GPU's copy does not fit")
    cpu_offload: bool = Field(False, description="with fsdp: weights, gradients and optimiser states in CPU memory")

    @model_validator(mode="after")
    def _subset_fits_method(self) -> "TrainConfig":
        if self.subset is not None and self.subset not in SUBSETS_OF[self.method]:
            raise ValueError(f"{self.method} trains on {' or '.join(SUBSETS_OF[self.method])}, not {self.subset!r}")
        if self.liger and self.method == "dpo":
            raise ValueError("liger cannot be used with DPO here: its reference log-probs are precomputed")
        if self.general_pairs is not None:
            if self.method != "rm":
                raise ValueError("general_pairs are for the reward model (method rm)")
            unknown = sorted(set(self.general_pairs) - set(GENERAL_PAIR_SHARES))
            if unknown or not self.general_pairs:
                raise ValueError(f"general_pairs takes {', '.join(GENERAL_PAIR_SHARES)}, not {unknown or 'nothing'}")
        if self.cpu_offload and self.sharding == "none":
            raise ValueError("cpu_offload needs sharding fsdp (or auto)")
        if self.packing and self.method != "sft":
            raise ValueError(f"packing is for SFT; {self.method} pairs are never packed")
        return self

    @property
    def recipe(self) -> Recipe:
        return RECIPES[self.method]

    def resolved(self) -> "TrainConfig":
        """The same config with every recipe default written out (what the run records)."""
        recipe = self.recipe
        filled = {
            "base_model": self.base_model or (None if self.method == "dpo" else BASE_MODEL),
            "subset": self.subset or recipe.subset,
            "epochs": self.epochs or recipe.epochs,
            "learning_rate": self.learning_rate or recipe.learning_rate,
            "max_length": self.max_length or recipe.max_length,
            "packing": recipe.packing if self.packing is None else self.packing,
            "global_batch_size": self.global_batch_size or recipe.global_batch_size,
            "beta": self.beta or recipe.beta,
            "warmup_steps": recipe.warmup if self.warmup_steps is None else self.warmup_steps,
            "adam_beta2": self.adam_beta2 or recipe.adam_beta2,
            "attn_implementation": self.attn_implementation or ("facets_varlen" if self.method == "sft" else "sdpa"),
        }
        return self.model_copy(update=filled)

    def accumulation_steps(self, processes: int) -> int:
        """Forward passes accumulated per optimiser step so one step sees `global_batch_size` rows."""
        wanted = self.global_batch_size or self.recipe.global_batch_size
        return max(1, round(wanted / (self.batch_size * processes)))


# The paper's suite, in its order: (name, method, subset, starts from: "base" or an earlier step, epochs)
JANUS_SUITE: tuple[tuple[str, str, str, str, float | None], ...] = (
    ("janus", "sft", "sft", "base", None),  # Janus: SFT on the full set, 4 epochs
    ("janus-star", "sft", "small", "base", None),  # Janus*: SFT on `small`
    ("janus-dpo", "dpo", "dpo", "janus-star", None),  # Janus+DPO: from Janus*
    ("janus-orpo", "orpo", "orpo", "base", None),  # Janus+ORPO: from the base model
    ("janus-1epoch", "sft", "sft", "base", 1),  # the start of the reward model: Janus trained 1 epoch
    ("janus-rm", "rm", "rm", "janus-1epoch", None),  # Janus-RM stage 1, on `rm`
    ("janus-rm-general", "rm", "rm", "janus-rm", None),  # stage 2, on general pairs (when they are given)
)


class JanusConfig(BaseModel):
    """The whole Janus suite on one release: each model goes to <output_dir>/<name>."""

    model_config = ConfigDict(extra="forbid")

    release: str
    output_dir: str = Field(description="the models' folder: one subfolder per model of the suite")
    base_model: str = BASE_MODEL
    only: list[str] | None = Field(None, description="these steps (and nothing else): names of JANUS_SUITE")
    general_pairs: dict[str, str] | None = Field(None, description="RM stage 2's datasets; without them it is skipped")
    overrides: dict = Field(default_factory=dict, description="TrainConfig fields given to every step "
                                                              "(device, max_steps, precision, sharding ...)")
    method: str | None = Field(None, description="ignored: what a build's train_after block passes along")

    @model_validator(mode="after")
    def _known_steps(self) -> "JanusConfig":
        names = [name for name, *_ in JANUS_SUITE]
        unknown = sorted(set(self.only or ()) - set(names))
        if unknown:
            raise ValueError(f"the suite has no step {', '.join(unknown)} (it has {', '.join(names)})")
        forbidden = sorted({"method", "release", "output_dir", "base_model", "subset"} & set(self.overrides))
        if forbidden:
            raise ValueError(f"overrides cannot set {', '.join(forbidden)}: each step sets its own")
        return self

    def steps(self) -> list[tuple[str, TrainConfig]]:
        """(name, its TrainConfig) in the suite's order; later steps start from earlier ones' folders."""
        folders: dict[str, str] = {"base": self.base_model}
        chosen: list[tuple[str, TrainConfig]] = []
        for name, method, subset, start, epochs in JANUS_SUITE:
            folders[name] = f"{self.output_dir.rstrip('/')}/{name}"
            if name == "janus-rm-general" and not self.general_pairs:
                continue
            if self.only is not None and name not in self.only:
                continue
            values = {**self.overrides, "method": method, "release": self.release, "subset": subset,
                      "output_dir": folders[name], "base_model": folders[start]}
            if epochs is not None and "max_steps" not in self.overrides:
                values["epochs"] = epochs
            if name == "janus-rm-general":
                values["general_pairs"] = self.general_pairs
            chosen.append((name, TrainConfig.model_validate(values)))
        return chosen
