"""SFT throughput on one GPU: our training path beside TRL's defaults, on Multifaceted-like rows (issue 5).

    python bench/train_throughput.py                    # a GPU: the ~1.1 B Mistral, packed rows of 8192
    python bench/train_throughput.py --quick            # any machine: a tiny model, short rows (checks the script)
    python bench/train_throughput.py --steps 30 --warmup 5 --ours-batch-size 1 --ours-checkpointing

The model is a Mistral built from a config and randomly initialised (hidden 2048, 22 layers, 32 heads,
8 KV heads, vocab 32000: about 1.1 B parameters); weights do not change the speed. Rows are SFT rows of
the release layout whose prompt (system + instruction) and response lengths are lognormal around 400 and
550 tokens, as in the Multifaceted Collection; a word-level tokenizer built on the fly makes one word one
token, so the lengths are exact. Every contender trains the same rows through TRL's SFTTrainer, with
the same seed, global batch and learning rate:

- trl-default: TRL's defaults for a prompt-completion dataset (no packing: each micro-batch of 8 rows
  padded to its longest; gradient checkpointing; SDPA), max_length raised to 8192 so no row is cut.
- trl-packing: TRL's bfd packing with padding_free (what TRL recommends), 1 packed row of 8192 per forward
  (larger micro-batches make SDPA's dense mask quadratic in the concatenated row), SDPA.
- facets: `facets train`'s SFT path: the same packing, the `facets_varlen` attention (PyTorch's varlen
  flash kernel: every sample attends only to itself and masked blocks cost nothing), Liger's kernels when
  liger-kernel is installed, fp32 master weights with bf16 compute, no gradient checkpointing unless asked.

Printed per contender: tokens/s over the timed steps (non-pad tokens only: padding is never counted),
MFU = model FLOPs / (time x peak), with model FLOPs 6 N per token (N without the embedding table) plus
causal attention 6 L d s per token of a sample of length s; peak memory; the loss per step. Then the
ratios to TRL's paths, the largest |loss difference| to trl-packing (same packed batches: the curves must
match to bf16 noise), and the largest model that fits one 80 GB GPU with our settings (bytes per
parameter of the weights, gradients and AdamW states, plus the activation peak measured here).
Targets (H100, 1.1 B): >= 50k tokens/s and >= 35 % MFU for facets; TRL 1.16 defaults measured 11-14k
tokens/s and 8-10 % MFU there. On a CPU only the ratios mean anything.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_TOKENS_S = 50_000
TARGET_MFU = 0.35
GPU_MEMORY_GB = 80
# dense bf16 peaks (TFLOP/s) by device name; --peak-tflops overrides
PEAKS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
FULL = dict(hidden=2048, layers=22, heads=32, kv_heads=8, intermediate=5632, vocab=32000, max_length=8192,
            prompt=400, response=550, rows=6000)
QUICK = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=2000, max_length=512,
             prompt=40, response=55, rows=400)


# -- data and model -----------------------------------------------------------------------------------------
def lognormal_length(rng: random.Random, median: int, sigma: float = 0.6, cap: int | None = None) -> int:
    return max(4, min(cap or 10**9, int(rng.lognormvariate(math.log(median), sigma))))


def make_rows(shape: dict, seed: int) -> list[dict]:
    """SFT release rows (system, prompt, output) of words w0..wV: one word, one token."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(shape["vocab"] - 8)]
    cap = shape["max_length"] // 2 - 16

    def text(n: int) -> str:
        return " ".join(rng.choices(words, k=n))

    rows = []
    for _ in range(shape["rows"]):
        prompt = lognormal_length(rng, shape["prompt"], cap=cap)
        system = max(1, prompt // 3)
        rows.append({"system": text(system), "prompt": text(prompt - system),
                     "output": text(lognormal_length(rng, shape["response"], cap=cap))})
    return rows


def make_tokenizer(shape: dict):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]"]
    vocab = {token: i for i, token in enumerate(special + [f"w{i}" for i in range(shape["vocab"] - 8)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def make_model(shape: dict, tokenizer, directory: Path) -> tuple[Path, int, int]:
    """A random-init Mistral saved as a model folder; returns it, all parameters and non-embedding ones."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                           intermediate_size=shape["intermediate"], num_hidden_layers=shape["layers"],
                           num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                           max_position_embeddings=shape["max_length"], sliding_window=None, bos_token_id=1,
                           eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MistralForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    non_embedding = total - model.model.embed_tokens.weight.numel()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory, total, non_embedding


# -- contenders ---------------------------------------------------------------------------------------------
class StepClock:
    """A TrainerCallback: wall time, tokens seen and loss at every optimiser step (GPU synchronised)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self):
                self.marks: list[tuple[float, int]] = []
                self.losses: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks.append((time.perf_counter(), state.num_input_tokens_seen))

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    self.losses.append(float(logs["loss"]))

        return _Clock()


def trl_trainer(name: str, rows, tokenizer, model_dir: Path, out: Path, a, on_cpu: bool):
    import torch
    from trl import SFTConfig, SFTTrainer

    packing = name == "trl-packing"
    micro = 1 if packing else 8  # 8 is TRL's per-device default
    args = SFTConfig(output_dir=str(out), max_length=a.max_length, packing=packing, max_steps=a.steps,
                     per_device_train_batch_size=micro, gradient_accumulation_steps=max(1, a.global_batch // micro),
                     learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                     save_strategy="no", report_to="none", seed=0, data_seed=0, use_cpu=on_cpu, bf16=not on_cpu,
                     gradient_checkpointing=not on_cpu, include_num_input_tokens_seen="non_padding",
                     dataloader_num_workers=0, shuffle_dataset=packing,  # packing: the same packed rows as ours
                     model_init_kwargs={"dtype": torch.float32 if on_cpu else torch.bfloat16,
                                                                  "attn_implementation": "sdpa"})
    return SFTTrainer(model=str(model_dir), args=args, train_dataset=rows, processing_class=tokenizer)


def facets_trainer(rows, tokenizer, model_dir: Path, out: Path, a, on_cpu: bool):
    from facets.schemas.training import TrainConfig
    from facets.training.trainers import build_trainer

    config = TrainConfig(method="sft", release=str(out), output_dir=str(out), base_model=str(model_dir),
                         max_length=a.max_length, max_steps=a.steps, learning_rate=a.lr, lr_scheduler="constant",
                         warmup_steps=0, batch_size=a.ours_batch_size, global_batch_size=a.global_batch,
                         logging_steps=1, save_steps=10**9, precision="fp32" if on_cpu else a.precision,
                         gradient_checkpointing=a.ours_checkpointing, device="cpu" if on_cpu else "cuda",
                         liger=None if not a.no_liger else False).resolved()
    trainer = build_trainer(config, rows, tokenizer, on_cpu=on_cpu)
    trainer.args.save_strategy = "no"
    return trainer


def run_contender(name: str, rows, tokenizer, model_dir: Path, work: Path, a, on_cpu: bool) -> dict:
    import torch

    out = work / name
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer = (facets_trainer(rows, tokenizer, model_dir, out, a, on_cpu) if name == "facets"
               else trl_trainer(name, rows, tokenizer, model_dir, out, a, on_cpu))
    clock = StepClock()
    trainer.add_callback(clock)
    lengths = sample_lengths(trainer)
    trainer.train()
    (t0, n0), (t1, n1) = clock.marks[a.warmup - 1], clock.marks[-1]
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    result = {"name": name, "tokens_per_s": (n1 - n0) / (t1 - t0), "seconds": t1 - t0, "tokens": n1 - n0,
              "losses": clock.losses, "peak_gb": peak_gb, "mean_len": lengths[0], "mean_sq_len": lengths[1]}
    del trainer
    gc.collect()
    return result


def sample_lengths(trainer) -> tuple[float, float]:
    """Mean sample length and mean of squared lengths (the attention FLOPs) of the rows as tokenised."""
    dataset = trainer.train_dataset
    if "seq_lengths" in dataset.column_names:
        lengths = [n for row in dataset["seq_lengths"] for n in row]
    else:
        lengths = [len(ids) for ids in dataset["input_ids"]]
    return sum(lengths) / len(lengths), sum(n * n for n in lengths) / len(lengths)


def mfu(result: dict, non_embedding: int, shape: dict, peak_flops: float | None) -> float | None:
    if not peak_flops:
        return None
    # per token: 6 N for the matmuls, and 6 L d s for causal attention of a sample of length s (mean s^2 / mean s)
    attention = 6 * shape["layers"] * shape["hidden"] * result["mean_sq_len"] / result["mean_len"]
    return result["tokens_per_s"] * (6 * non_embedding + attention) / peak_flops


def peak_of_device(given: float | None) -> float | None:
    import torch

    if given:
        return given * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((tflops * 1e12 for key, tflops in PEAKS.items() if key in name), None)


def largest_model_b(peak_gb: float, total_params: int, precision: str) -> float:
    """Parameters (billions) whose weights, gradients and AdamW states fit 80 GB beside this run's activations."""
    per_param = {"fp32-master": 16, "fp32": 16, "bf16-stochastic": 6}[precision]
    activations = max(0.0, peak_gb - total_params * per_param / 2**30)
    return (GPU_MEMORY_GB * 1e9 / 1.074 - activations * 2**30) / per_param / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny model and short rows, for any machine")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per contender (default 20; quick 6)")
    parser.add_argument("--warmup", type=int, default=None, help="steps left out of the timing (default 4; quick 2)")
    parser.add_argument("--global-batch", type=int, default=8, help="rows per optimiser step (packed rows when packing)")
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--precision", default="fp32-master", choices=["fp32-master", "bf16-stochastic"])
    parser.add_argument("--ours-batch-size", type=int, default=1, help="packed rows per forward, ours")
    parser.add_argument("--ours-checkpointing", action="store_true", help="gradient checkpointing on, ours")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--only", action="append", choices=["trl-default", "trl-packing", "facets"])
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: by its name)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    a = parser.parse_args(argv)
    import torch

    shape = dict(QUICK if a.quick else FULL)
    a.steps = a.steps or (6 if a.quick else 20)
    a.warmup = a.warmup or (2 if a.quick else 4)
    a.max_length = shape["max_length"]
    on_cpu = not torch.cuda.is_available()
    if on_cpu and not a.quick:
        print("no GPU: the full-size run needs one; running --quick instead", file=sys.stderr)
        shape, a.quick = dict(QUICK), True
        a.max_length = shape["max_length"]
    import datasets

    from facets.training.data import RowFormatter

    with tempfile.TemporaryDirectory(prefix="facets-train-bench-") as tmp:
        work = Path(tmp)
        tokenizer = make_tokenizer(shape)
        model_dir, total, non_embedding = make_model(shape, tokenizer, work / "model")
        formatter = RowFormatter("sft", "mistral")
        rows = datasets.Dataset.from_list([formatter(r) for r in make_rows(shape, seed=0)])
        device = torch.cuda.get_device_name() if not on_cpu else "CPU"
        print(f"device {device}; model {total / 1e9:.3f} B parameters ({non_embedding / 1e9:.3f} B without "
              f"embeddings), {shape['layers']} layers x {shape['hidden']}; {len(rows)} rows, prompt ~{shape['prompt']} "
              f"response ~{shape['response']} tokens (lognormal); {a.steps} steps, {a.warmup} untimed; "
              f"global batch {a.global_batch}; max length {a.max_length}")
        peak = peak_of_device(a.peak_tflops)
        results = []
        for name in a.only or ["trl-default", "trl-packing", "facets"]:
            result = run_contender(name, rows, tokenizer, model_dir, work, a, on_cpu)
            result["mfu"] = mfu(result, non_embedding, shape, peak)
            results.append(result)
            shown = f"{100 * result['mfu']:.1f} %" if result["mfu"] is not None else "n/a (no known peak)"
            print(f"{name:<12} {result['tokens_per_s']:>10,.0f} tokens/s  MFU {shown:<20} peak {result['peak_gb']:.1f} GB  "
                  f"loss {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}", flush=True)
        report(results, a, total, on_cpu)
        if a.json:
            a.json.write_text(json.dumps({"device": device, "params": total, "results": results}, indent=2))
    return 0


def report(results: list[dict], a, total: int, on_cpu: bool) -> None:
    by = {r["name"]: r for r in results}
    ours = by.get("facets")
    if not ours:
        return
    for other in ("trl-default", "trl-packing"):
        if other in by:
            print(f"facets / {other}: x{ours['tokens_per_s'] / by[other]['tokens_per_s']:.2f} tokens/s")
    if "trl-packing" in by:
        diffs = [abs(x - y) for x, y in zip(ours["losses"], by["trl-packing"]["losses"])]
        print(f"loss curve, facets vs trl-packing (same packed batches): max |diff| {max(diffs):.2e} over {len(diffs)} steps")
    if on_cpu:
        print("CPU: ratios only; the targets (>= 50k tokens/s, >= 35 % MFU) are for an H100")
        return
    hit = "met" if ours["tokens_per_s"] >= TARGET_TOKENS_S and (ours["mfu"] or 0) >= TARGET_MFU else "NOT met"
    print(f"target >= {TARGET_TOKENS_S:,} tokens/s and >= {100 * TARGET_MFU:.0f} % MFU: {hit}")
    print(f"largest model for full fine-tuning on one {GPU_MEMORY_GB} GB GPU with {a.precision}: "
          f"~{largest_model_b(ours['peak_gb'], total, a.precision):.1f} B parameters "
          f"(bf16-stochastic: ~{largest_model_b(ours['peak_gb'], total, 'bf16-stochastic'):.1f} B)")


if __name__ == "__main__":
    sys.exit(main())
