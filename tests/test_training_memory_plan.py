"""The memory plan: per-GPU weights, gradients, optimiser states and activations, worked out before loading."""
from __future__ import annotations

from dataclasses import replace

import pytest

from facets.training.memory_plan import (MISTRAL_7B, PlanInputs, largest_fitting, model_shape, plan)

PAPER_SFT = PlanInputs(shape=MISTRAL_7B, method="sft", precision="fp32-master", length=8192, gpu_memory_gib=80)


def test_the_paper_s_base_model_has_7_24_b_parameters():
    assert MISTRAL_7B.parameters() == pytest.approx(7.2417e9, rel=1e-4)


def test_the_paper_s_sft_fits_4_x_80_gb_only_when_sharded():
    alone = plan(PAPER_SFT)
    assert not alone.fits
    assert alone.parts_gib["weights"] + alone.parts_gib["gradients"] + alone.parts_gib["optimiser states"] == \
        pytest.approx(7.2417e9 * 16 / 2**30, rel=1e-3), "16 bytes a parameter: about 116 GB"
    copied = plan(replace(PAPER_SFT, gpus=4, sharding="none"))
    assert not copied.fits and copied.total_gib == pytest.approx(alone.total_gib), "data parallel copies it all"
    assert "--sharding fsdp on these 4 GPUs" in copied.alternatives
    sharded = plan(replace(PAPER_SFT, gpus=4, sharding="fsdp"))
    assert sharded.fits and sharded.total_gib < 40
    assert sharded.parts_gib["optimiser states"] == pytest.approx(copied.parts_gib["optimiser states"] / 4)
    assert "fits" in sharded.text() and "NOT" not in sharded.text()
    assert "does NOT fit" in alone.text() and "would fit: --sharding fsdp on 2 or more GPUs" in alone.text()


def test_what_fits_one_80_gb_gpu():
    assert plan(replace(PAPER_SFT, precision="bf16-stochastic")).fits, "6 bytes a parameter: the 7B fits"
    fp32_master = largest_fitting(PAPER_SFT)
    lean = largest_fitting(replace(PAPER_SFT, precision="bf16-stochastic"))
    assert 4.0e9 < fp32_master.parameters() < 5.0e9 < 7.24e9 < 11e9 < lean.parameters() < 13e9
    assert not plan(replace(PAPER_SFT, shape=replace(fp32_master, layers=fp32_master.layers + 1))).fits


def test_methods_differ_where_they_should():
    dpo = replace(PAPER_SFT, method="dpo", length=2048, gpus=4, sharding="fsdp")
    assert plan(dpo).parts_gib["activations"] == pytest.approx(
        2 * plan(replace(dpo, method="sft")).parts_gib["activations"]), "a pair is two sequences"
    held = plan(replace(dpo, reference="held"))
    assert held.parts_gib["reference model (bf16)"] == pytest.approx(7.2417e9 * 2 / 4 / 2**30, rel=1e-3)
    assert "reference model (bf16)" not in plan(dpo).parts_gib, "precomputed reference log-probs hold no model"
    rm = plan(replace(dpo, method="rm"))
    assert rm.parameters < plan(dpo).parameters, "a one-value head in place of the 32000-way head"
    offloaded = plan(replace(dpo, cpu_offload=True))
    assert offloaded.parts_gib["weights"] == 0 and offloaded.total_gib < plan(dpo).total_gib
    no_checkpointing = plan(replace(PAPER_SFT, activation_checkpointing=False, gpus=4, sharding="fsdp"))
    assert no_checkpointing.parts_gib["activations"] > 5 * plan(replace(PAPER_SFT)).parts_gib["activations"]


def test_the_shape_is_read_from_config_json_without_loading(tmp_path):
    from transformers import MistralConfig

    MistralConfig(vocab_size=600, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16).save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    from transformers import MistralForCausalLM

    built = MistralForCausalLM(MistralConfig.from_pretrained(tmp_path))
    assert shape.parameters() == sum(p.numel() for p in built.parameters())
    assert model_shape("mistral-community/Mistral-7B-v0.2") == MISTRAL_7B
    assert model_shape(str(tmp_path / "nowhere")) is None
