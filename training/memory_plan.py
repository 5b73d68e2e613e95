"""GPU memory of a training run, worked out from the model's shape before anything is loaded.

Per GPU: weights + gradients + optimiser states (sharded over the GPUs by FSDP full shard, or kept whole on
every GPU without sharding), the unsharded layer FSDP gathers while it computes, a DPO reference model
when one is held, activations for one micro-batch, and a fixed overhead (CUDA context, communication
buffers, allocator slack). The verdict says whether it fits and, when it does not, what would.
Estimates, not measurements: sizes are in GiB (2**30 bytes).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

GIB = 2**30
OVERHEAD_GIB = 2.0  # CUDA context, NCCL buffers, allocator fragmentation
USABLE = 0.95  # of a GPU's memory, the rest left to the allocator's slack

# bytes a trained parameter costs: (weights, gradients, optimiser states)
PRECISION_BYTES = {
    "fp32-master": (4, 4, 8),  # fp32 weights, fp32 gradients, AdamW m and v in fp32; bf16 compute
    "fp32": (4, 4, 8),  # the same memory, fp32 compute (activations twice as large)
    "bf16-stochastic": (2, 2, 2),  # bf16 weights and gradients, 8-bit AdamW (m and v one byte each)
}
# sequences a row puts through the model: a preference pair is its chosen and its rejected answer
SEQUENCES_PER_ROW = {"sft": 1, "dpo": 2, "orpo": 2, "rm": 2}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a decoder's memory (a Llama/Mistral-style model: GQA attention, SwiGLU MLP)."""

    vocab_size: int
    hidden_size: int
    layers: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    tied_embeddings: bool = False

    @classmethod
    def from_config(cls, config: dict) -> "ModelShape":
        heads = config["num_attention_heads"]
        return cls(vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
                   layers=config["num_hidden_layers"], intermediate_size=config["intermediate_size"], heads=heads,
                   kv_heads=config.get("num_key_value_heads") or heads,
                   head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                   tied_embeddings=bool(config.get("tie_word_embeddings", False)))

    @property
    def layer_parameters(self) -> int:
        d, attention = self.hidden_size, self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return d * attention * 2 + d * kv * 2 + 3 * d * self.intermediate_size + 2 * d

    def parameters(self, head: str = "lm") -> int:
        """All parameters; `head` rm: a one-value head in place of the language-model head."""
        embeddings = self.vocab_size * self.hidden_size
        out = self.hidden_size if head == "rm" else (0 if self.tied_embeddings else embeddings)
        return embeddings + out + self.layers * self.layer_parameters + self.hidden_size


# Mistral-7B-v0.2, the paper's base model: 7.24 B parameters
MISTRAL_7B = ModelShape(vocab_size=32000, hidden_size=4096, layers=32, intermediate_size=14336, heads=32, kv_heads=8,
                        head_dim=128)


@dataclass(frozen=True)
class PlanInputs:
    shape: ModelShape
    method: str = "sft"
    precision: str = "fp32-master"
    sharding: str = "none"  # none | fsdp
    gpus: int = 1
    gpu_memory_gib: float = 80.0
    length: int = 8192  # tokens per row (SFT: per packed row)
    batch_size: int = 1  # rows per GPU per forward pass
    activation_checkpointing: bool = True
    cpu_offload: bool = False  # FSDP: parameters, gradients and optimiser states in CPU memory
    reference: str = "precomputed"  # DPO: precomputed (log-probs computed once, no second model) or held


@dataclass
class MemoryPlan:
    inputs: PlanInputs
    parameters: int
    parts_gib: dict[str, float]
    alternatives: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(self.parts_gib.values())

    @property
    def usable_gib(self) -> float:
        return self.inputs.gpu_memory_gib * USABLE

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.usable_gib

    def text(self) -> str:
        i = self.inputs
        sharding = "no sharding"
        if i.sharding == "fsdp":
            sharding = "FSDP full shard" + (" + CPU offload" if i.cpu_offload else "")
        lines = [f"memory plan: {i.method}, {self.parameters / 1e9:.2f} B parameters, {i.precision}, {sharding}, "
                 f"{i.gpus} x {i.gpu_memory_gib:g} GiB, length {i.length} x {i.batch_size} row(s) per GPU"
                 f"{', activation checkpointing' if i.activation_checkpointing else ''}"]
        lines += [f"  {name:<22}{gib:8.1f} GiB" for name, gib in self.parts_gib.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(f"  {'per GPU':<22}{self.total_gib:8.1f} GiB of {self.usable_gib:.1f} usable: {verdict}")
        if not self.fits and self.alternatives:
            lines.append("  would fit: " + "; ".join(self.alternatives))
        return "\n".join(lines)


def _activations_gib(i: PlanInputs) -> float:
    """One micro-batch: with checkpointing, each layer's input kept plus one layer recomputed at a time;
    without, every layer's saved tensors (a Llama-style layer saves about 7 d + 4 ff values a token).
    Plus the logits in fp32 (a value per token for the reward model)."""
    s = i.shape
    tokens = i.length * i.batch_size * SEQUENCES_PER_ROW[i.method]
    scale = 2 if i.precision == "fp32" else 1  # fp32 compute keeps fp32 activations
    per_layer = tokens * (7 * s.hidden_size + 4 * s.intermediate_size) * 2 * scale
    if i.activation_checkpointing:
        kept = s.layers * tokens * s.hidden_size * 2 * scale + per_layer
    else:
        kept = s.layers * per_layer
    logits = tokens * 4 * (1 if i.method == "rm" else s.vocab_size)
    return (kept + logits) / GIB


def _sharded(i: PlanInputs) -> bool:
    return i.sharding == "fsdp" and i.gpus > 1


def plan(i: PlanInputs, suggest: bool = True) -> MemoryPlan:
    s = i.shape
    n = s.parameters("rm" if i.method == "rm" else "lm")
    weights, grads, optimiser = PRECISION_BYTES[i.precision]
    share = i.gpus if _sharded(i) else 1
    on_gpu = 0.0 if (i.sharding == "fsdp" and i.cpu_offload) else 1.0
    parts = {
        "weights": n * weights / share * on_gpu / GIB,
        "gradients": n * grads / share * on_gpu / GIB,
        "optimiser states": n * optimiser / share * on_gpu / GIB,
    }
    if i.sharding == "fsdp":
        # the layer in use and the next (prefetched) gathered in bf16, with one layer's fp32 gradients before
        # they are reduce-scattered; the embeddings and the head are the largest unit gathered
        unit = max(s.layer_parameters, s.vocab_size * s.hidden_size * (1 if s.tied_embeddings else 2))
        parts["gathered for compute"] = (2 * unit * 2 + unit * 4) / GIB
    if i.method == "dpo" and i.reference == "held":
        parts["reference model (bf16)"] = n * 2 / share / GIB
    parts["activations"] = _activations_gib(i)
    parts["overhead"] = OVERHEAD_GIB
    result = MemoryPlan(inputs=i, parameters=n, parts_gib=parts)
    if suggest and not result.fits:
        result.alternatives = alternatives(i)
    return result


def fewest_gpus(i: PlanInputs, most: int = 64) -> int | None:
    """The fewest GPUs of this size on which FSDP full shard fits, or None."""
    for gpus in range(2, most + 1):
        if plan(replace(i, sharding="fsdp", gpus=gpus), suggest=False).fits:
            return gpus
    return None


def alternatives(i: PlanInputs) -> list[str]:
    """What would fit, nearest first: sharding over these GPUs, fewest GPUs, a leaner precision, offload."""
    found: list[str] = []
    if i.gpus > 1 and i.sharding != "fsdp" and plan(replace(i, sharding="fsdp"), suggest=False).fits:
        found.append(f"--sharding fsdp on these {i.gpus} GPUs")
    gpus = fewest_gpus(i)
    if gpus is not None and gpus != i.gpus:
        found.append(f"--sharding fsdp on {gpus} or more GPUs of {i.gpu_memory_gib:g} GiB")
    if i.precision != "bf16-stochastic" and plan(replace(i, precision="bf16-stochastic"), suggest=False).fits:
        found.append("--precision bf16-stochastic (bf16 weights, 8-bit AdamW: 6 bytes a parameter)")
    if not i.activation_checkpointing and plan(replace(i, activation_checkpointing=True), suggest=False).fits:
        found.append("activation checkpointing")
    if i.gpus > 1 and not i.cpu_offload and plan(replace(i, sharding="fsdp", cpu_offload=True), suggest=False).fits:
        found.append("--sharding fsdp --cpu-offload (slow: every step moves the model over PCIe)")
    return found or ["nothing on these GPUs: a smaller model, a shorter length, or larger GPUs"]


def largest_fitting(i: PlanInputs) -> ModelShape | None:
    """The deepest model of this width (the same layer, more or fewer of them) that fits, or None."""
    best = None
    for layers in range(1, 4 * i.shape.layers + 1):
        shape = replace(i.shape, layers=layers)
        if not plan(replace(i, shape=shape), suggest=False).fits:
            break
        best = shape
    return best


def model_shape(base_model: str) -> ModelShape | None:
    """The shape from the model's config.json (a local folder or the Hugging Face cache), without loading it;
    the paper's base model is known without either. None when it cannot be found."""
    from facets.schemas.training import BASE_MODEL

    path = Path(base_model).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "config.json")
        except (ImportError, ValueError):
            cached = None
        if not isinstance(cached, str):
            return MISTRAL_7B if base_model == BASE_MODEL else None
        path = Path(cached)
    config = json.loads(path.read_text())
    config = config.get("text_config", config)
    try:
        return ModelShape.from_config(config)
    except KeyError:
        return None


def plan_for(config, processes: int, gpu_memory_gib: float | None, sharding: str | None = None) -> MemoryPlan | None:
    """The plan of a resolved TrainConfig on `processes` GPUs (80 GiB each when none is visible: the paper's
    A100s); None when the model's shape cannot be read without loading it."""
    shape = model_shape(config.base_model)
    if shape is None:
        return None
    checkpointing = True if config.gradient_checkpointing is None else config.gradient_checkpointing
    return plan(PlanInputs(shape=shape, method=config.method, precision=config.precision,
                           sharding=sharding or ("fsdp" if config.sharding == "fsdp" else "none"), gpus=processes,
                           gpu_memory_gib=gpu_memory_gib or 80.0, length=config.max_length or 2048,
                           batch_size=config.batch_size, activation_checkpointing=checkpointing,
                           cpu_offload=config.cpu_offload))
