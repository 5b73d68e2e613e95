"""The Janus suite as one flow: each model a `train` subflow, in the paper's order, skipping what is done."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from facets.schemas.training import BASE_MODEL, JanusConfig

pytest.importorskip("torch", reason="the training extra (torch) is installed by `make test`")


def test_the_suite_runs_in_the_paper_s_order_each_from_its_start(tmp_path):
    config = JanusConfig(release="data", output_dir=str(tmp_path))
    steps = dict(config.steps())
    assert list(steps) == ["janus", "janus-star", "janus-dpo", "janus-orpo", "janus-1epoch", "janus-rm"]
    assert (steps["janus"].method, steps["janus"].subset, steps["janus"].base_model) == ("sft", "sft", BASE_MODEL)
    assert steps["janus-star"].subset == "small"
    assert steps["janus-dpo"].base_model == str(tmp_path / "janus-star"), "DPO from Janus*, never the base"
    assert steps["janus-orpo"].base_model == BASE_MODEL, "ORPO from the base model"
    assert steps["janus-1epoch"].epochs == 1 and steps["janus-rm"].base_model == str(tmp_path / "janus-1epoch")
    general = JanusConfig(release="data", output_dir=str(tmp_path), general_pairs={"hh-rlhf": "Anthropic/hh-rlhf"})
    stage2 = dict(general.steps())["janus-rm-general"]
    assert stage2.base_model == str(tmp_path / "janus-rm") and stage2.general_pairs == {"hh-rlhf": "Anthropic/hh-rlhf"}
    with pytest.raises(ValueError, match="no step janus-ppo"):
        JanusConfig(release="data", output_dir="m", only=["janus-ppo"])
    with pytest.raises(ValueError, match="cannot set base_model"):
        JanusConfig(release="data", output_dir="m", overrides={"base_model": "x"})


def test_a_build_s_train_after_can_start_the_suite():
    from facets.schemas.config import TrainAfter

    after = TrainAfter(deployment="janus/suite")
    parameters = after.train_config("data/releases/v1", "v1", "data")
    config = JanusConfig.model_validate(parameters)
    assert config.release == "data/releases/v1" and config.steps()[0][1].release == "data/releases/v1"


@pytest.mark.slow
def test_the_janus_flow_trains_the_suite_once(prefect_server, tmp_path):
    from facets.flows.janus import janus
    from training_fixtures import corpus, tiny_mistral, write_release

    model = tiny_mistral(tmp_path / "tiny", corpus())
    write_release(tmp_path / "data")
    overrides = {"device": "cpu", "max_steps": 1, "precision": "fp32", "max_length": 512, "batch_size": 2,
                 "global_batch_size": 2, "warmup_steps": 0}
    config = JanusConfig(release=str(tmp_path / "data"), output_dir=str(tmp_path / "models"), base_model=str(model),
                         overrides=overrides)
    first = janus(config)
    assert list(first) == ["janus", "janus-star", "janus-dpo", "janus-orpo", "janus-1epoch", "janus-rm"]
    assert all(r["steps"] == 1 and not r["already_trained"] for r in first.values())
    assert first["janus-rm"]["evaluation"]["pairs"] == 3
    summary = json.loads((tmp_path / "models" / "janus-dpo" / "train_summary.json").read_text())
    assert summary["config"]["base_model"] == str(tmp_path / "models" / "janus-star")
    assert (tmp_path / "models" / "janus-rm" / "config.json").is_file()

    again = janus(config)  # everything done: nothing trains again
    assert all(r["already_trained"] for r in again.values())
    assert Path(tmp_path / "models" / "janus" / "metrics.jsonl").read_text().count('"loss"') == 1
