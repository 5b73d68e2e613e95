"""The stages are declared once (schemas/stages.py): every list, the fingerprint chain, the runners and the
templates derive from that declaration, under one name per stage."""
from __future__ import annotations

import typing

import pytest

from facets.schemas.config import BuildConfig, LLMStage
from facets.schemas.stages import BENCH_STAGES, LLM_STAGES, STAGE_NAMES, STAGES
from facets.storage import STAGE_MODELS
from facets.tasks.plan import Fingerprints, StagePlan
from facets.tasks.stages import RUNNERS, load_templates, module_of
from facets.tasks.templates import TemplateError, load_template


def test_each_stage_reads_the_one_before_it():
    assert STAGES[0].reads is None
    assert [stage.reads for stage in STAGES[1:]] == list(STAGE_NAMES[:-1])


def test_every_list_of_stages_derives_from_the_declaration():
    assert list(STAGE_MODELS) == ["instructions", *STAGE_NAMES]
    assert all(STAGE_MODELS[stage.name] is stage.row for stage in STAGES)
    assert typing.get_args(LLMStage) == LLM_STAGES == ("preference_trees", "system_messages", "responses")
    assert Fingerprints._fields == STAGE_NAMES
    assert list(RUNNERS) == list(STAGE_NAMES)
    assert BENCH_STAGES == ("preference_trees", "preference_sets", "system_messages", "responses", "bench_rubrics")


def test_a_stage_has_one_name_for_its_module_template_config_and_defaults():
    config = BuildConfig()
    templates = load_templates(config)
    assert set(templates) == set(LLM_STAGES) == set(config.stages)
    for stage in STAGES:
        assert module_of(stage).STAGE == stage.name
        if stage.calls_llm:
            assert templates[stage.name].version.startswith(f"{stage.name}@")
            assert config.stages[stage.name].sampling.max_tokens == stage.max_tokens


def test_the_fingerprint_chain_follows_the_stages():
    config = BuildConfig(seed=1)
    plan = StagePlan.of(config, load_templates(config))
    first, again = plan.fingerprints("abc"), plan.fingerprints("abc")
    assert first == again and len(set(first)) == len(STAGES)
    # another seed moves the choices without a call (sets, pairs) and what follows them, never the trees
    other = StagePlan.of(config.model_copy(update={"seed": 2}), load_templates(config)).fingerprints("abc")
    assert other.preference_trees == first.preference_trees
    assert all(getattr(other, name) != getattr(first, name) for name in STAGE_NAMES[1:])
    # a bench item's single set is part of its plan
    assert StagePlan.of(config, load_templates(config), sets=1).fingerprints("abc").preference_sets != first.preference_sets


def test_a_template_under_its_earlier_name_is_refused_not_passed_over(tmp_path):
    (tmp_path / "gold_response.txt").write_text("### system\nx\n### user\ny\n")
    with pytest.raises(TemplateError, match="rename it to responses.txt"):
        load_template("responses", tmp_path)
    (tmp_path / "responses.txt").write_text("### system\nmine\n### user\n$instruction\n")
    assert load_template("responses", tmp_path).path == str(tmp_path / "responses.txt")
