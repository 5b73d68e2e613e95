"""The `paper` profile: the paper's settings in one shipped file, its source mix checked against the published
table, and the release card's "Fidelity" section that compares any build with it."""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from facets.ingest.sources import MAIN_SOURCES
from facets.pipeline.selection import Pool
from facets.release.fidelity import differences, unknowns
from facets.schemas import Instruction, PreferenceSet
from facets.schemas.config import BuildConfig
from facets.schemas.profiles import load_profile
from facets.storage import Store
from facets.tasks.plan import StagePlan
from facets.tasks.stages import load_templates
from facets.tasks.system_messages import describe

PUBLISHED = Path(__file__).parent / "data" / "published" / "multifaceted_source_counts.md"
SOURCE_NAMES = {"Nectar": "nectar", "OpenHermesPreferences": "openhermes", "ultrafeedback_binarized_cleaned": "ultrafeedback"}


def published_counts() -> dict[str, int]:
    """The card's table as printed: `source/original` -> count, for the rows that are known."""
    counts, source = {}, None
    for line in PUBLISHED.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"[\d,]+", cells[2]):
            continue
        source = SOURCE_NAMES.get(cells[0], source) if cells[0] else source
        original = "-" if cells[1].startswith("- (no original") else cells[1]
        counts[f"{source}/{original}"] = int(cells[2].replace(",", ""))
    return counts


def test_the_profile_carries_every_published_count_and_marks_the_rest_unknown():
    quotas = load_profile("paper")["quotas"]
    published = published_counts()
    assert len(published) == 20 and sum(v for k, v in published.items() if k.startswith("nectar/")) == 13_978
    assert {k: v for k, v in quotas.items() if v is not None} == published
    # every source whose table is incomplete is there, unknown (null), never guessed
    assert {k for k, v in quotas.items() if v is None} == {"openhermes", "ultrafeedback", "chatbot_arena", "dsp"}


def test_a_paper_build_config_has_the_papers_settings_and_overrides_win():
    config = BuildConfig(profile="paper")
    assert config.limit == 65_653 and config.sets_per_instruction == 3
    assert {config.model_of(s) for s in config.stages} == {"gpt-4-0125-preview"}
    assert config.system_message_from == "descriptions"
    mine = BuildConfig(profile="paper", quotas={"dsp": 1200}, stages={"responses": {"model": "gpt-4o"}})
    assert mine.quotas["dsp"] == 1200 and mine.quotas["nectar/anthropic-hh"] == 6037
    assert mine.model_of("responses") == "gpt-4o" and mine.stages["responses"].sampling.max_tokens == 4096
    with pytest.raises(ValueError, match="no profile 'papper'"):
        BuildConfig(profile="papper")


def test_the_source_mix_of_a_synthetic_pool_matches_the_published_counts(tmp_path):
    """A pool with more of every group than the card counts: the first 65,653 drawn hold exactly the published
    count of each known group, and the unknown groups fill the rest."""
    quotas = load_profile("paper")["quotas"]
    known = {k: v for k, v in quotas.items() if v is not None}
    groups = {**{k: v + 50 for k, v in known.items()},
              "openhermes/airoboros2.2": 9_000, "ultrafeedback/evol_instruct": 4_000, "chatbot_arena/": 3_000,
              "dsp/": 2_000}
    store = Store(str(tmp_path))
    main = {name: main for name, main in MAIN_SOURCES.items()}
    rows = [Instruction.from_text(f"{group} instruction {i}", main[group.split("/")[0]],
                                  "" if group.endswith("/-") else group.split("/", 1)[1])
            for group, n in groups.items() for i in range(n)]
    store.write("instructions", rows)
    pool = Pool(store, seed=0, quotas=quotas)
    drawn = pool.order[:65_653]
    group_of = {r.id: g for r, g in zip(rows, (g for g, n in groups.items() for _ in range(n)))}
    taken = Counter(group_of[i] for i in drawn)
    assert {g: taken[g] for g in known} == known
    filled = 65_653 - sum(known.values())
    assert sum(taken[g] for g in groups if g not in known) == filled
    # the 50 spare of every known group come last: replacements for failed instructions
    assert {group_of[i] for i in pool.order[-50 * len(known):]} == set(known)


def test_a_rebuild_keeps_the_mix_when_instructions_of_an_earlier_build_are_complete(tmp_path):
    store = Store(str(tmp_path))
    rows = [Instruction.from_text(f"a {i}", "Nectar", "sharegpt") for i in range(30)]
    rows += [Instruction.from_text(f"b {i}", "Nectar", "ultrachat") for i in range(30)]
    store.write("instructions", rows)
    quotas = {"nectar/sharegpt": 5, "nectar/ultrachat": 5}
    complete = {r.id for r in rows[30:]}  # an earlier build without quotas made 30 ultrachat ones
    pool = Pool(store, seed=0, quotas=quotas)
    pool.prefer(complete)
    first = pool.order[:10]
    assert sum(i in complete for i in first) == 5, "complete ones go first, within their quota only"


def test_fidelity_lists_what_differs_from_the_paper_and_nothing_for_the_profile():
    paper = BuildConfig(profile="paper").model_dump(mode="json")
    assert differences(paper) == []
    assert any("unknown for openhermes" in note for note in unknowns(paper))
    default = differences(BuildConfig(limit=500).model_dump(mode="json"))
    rows = {setting: (ours, theirs) for setting, ours, theirs in default}
    assert rows["responses: model"] == ("gpt-4o-mini", "gpt-4-0125-preview")
    assert rows["limit"] == ("500", "65,653")
    assert rows["system_message_from"] == ("preferences", "descriptions")
    assert rows["source mix"][1] == "published counts for 20 original sources (47,986 instructions)"


def test_system_messages_from_descriptions_change_only_their_own_prompt_and_what_follows():
    preference_set = PreferenceSet.model_validate({
        "instruction_id": "i", "fingerprint": "f", "set_index": 0, "preferences": [
            {"dimension": d, "subdimension": "sub", "preference": "kw", "description": f"{d} described."}
            for d in ("style", "background_knowledge", "informativeness", "harmlessness")]})
    assert describe(preference_set, "descriptions") == "\n".join(
        f"- {d} described." for d in ("style", "background_knowledge", "informativeness", "harmlessness"))
    assert '"kw"' in describe(preference_set)
    before, after = BuildConfig(), BuildConfig(system_message_from="descriptions")
    one = StagePlan.of(before, load_templates(before)).fingerprints("i")
    two = StagePlan.of(after, load_templates(after)).fingerprints("i")
    assert one[:2] == two[:2] and all(a != b for a, b in zip(one[2:], two[2:]))


def test_a_paper_profile_build_lists_in_its_card_only_what_it_could_not_match(tmp_path, prefect_server):
    import asyncio

    from facets.flows.build import build_collection
    from facets.schemas.stages import LLM_STAGES
    from facets.simulator.server import run_simulator

    sources = Path(__file__).parent / "data" / "sources"
    with run_simulator(seed=2) as sim:
        config = BuildConfig.model_validate({
            "profile": "paper", "limit": 6, "shard_size": 4, "data_dir": str(tmp_path),
            "sources": [f"nectar={sources / 'nectar' / 'data.jsonl'}",
                        f"dsp={sources / 'dsp' / 'domain_specific_preference.json'}"],
            "endpoint": {"base_url": sim.base_url, "api_key": "sk-test", "model": "facets-sim",
                         "limits": {"rpm": 60_000}},
            "stages": {stage: {"model": "facets-sim"} for stage in LLM_STAGES}})
        report = asyncio.run(build_collection(config))
    assert report["accepted"] == 6
    card = (Path(report["release"]["path"]) / "README.md").read_text()
    fidelity = card.split("## Fidelity", 1)[1].split("\n## ", 1)[0]
    settings = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \| ([^|]+?) \|$", fidelity, re.M)[1:]  # after the header
    assert {s for s, _, _ in settings} == {*(f"{stage}: model" for stage in LLM_STAGES), "limit", "sources"}
    assert ("limit", "6", "65,653") in settings
    assert "unknown for openhermes, ultrafeedback, chatbot_arena, dsp" in fidelity
    assert "cc-by-4.0" in card.split("---", 2)[1] and "## Licence" in card
