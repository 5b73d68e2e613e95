"""The dataset card (README.md) of a release: YAML front matter the hub reads, then the facts of the build.

The front matter's `configs` name each subset's data files, so the hub viewer and
`load_dataset(repo, "sft")` see the subsets and the RM test split. A cost is printed as "unknown" when
a model's price is not known, never as 0.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from facets.release.fidelity import differences, unknowns
from facets.release.markdown import markdown_table
from facets.release.sunburst import Node

PAPER = ('Lee et al., "Aligning to Thousands of Preferences via System Message Generalization", '
         "NeurIPS 2024, [arXiv:2405.17977](https://arxiv.org/abs/2405.17977)")
CITATION = """@article{lee2024aligning,
  title={Aligning to Thousands of Preferences via System Message Generalization},
  author={Lee, Seongyun and Park, Sue Hyun and Kim, Seungone and Seo, Minjoon},
  journal={arXiv preprint arXiv:2405.17977},
  year={2024}
}"""
LAYOUTS = {
    "sft": "`main_source, original_source, preference_set[{dimension, subdimension, preference, description}], system, prompt, output`: one row per (instruction, preference set)",
    "small": "as `sft`, one row per instruction: the set whose response is `chosen` in the pairs",
    "dpo": "`main_source, original_source, system, prompt, chosen[{content, role}], rejected[{content, role}]`: system of the chosen set; each side a user + assistant chat",
    "orpo": "as `dpo`",
    "rm": "`input` (system + newline + prompt), `chosen`, `rejected` as strings; train and test splits",
}
# Keys whose values are secrets: `api_key`, `hf_token`, `password`; not counts such as `max_tokens`.
_SECRET = re.compile(r"(keys?|(^|_)token|secrets?|passwords?|credentials?)$", re.IGNORECASE)
SIMULATOR_MODEL = "facets-sim"


@dataclass
class CardFacts:
    version: str
    content_hash: str
    splits: dict[str, dict[str, int]]              # subset -> split -> rows
    instructions: int
    sources: list[tuple[str, int, int]]            # (main_source, instructions, sft rows)
    stages: list[dict[str, Any]]                   # stage, expected, found, stale, duplicates
    left_out: dict[str, int]                       # reason -> instructions
    failures: list[tuple[str, str, int]]           # (stage, reason, rows)
    models: dict[str, str]
    prompt_versions: dict[str, str]
    usage: dict[str, dict]
    build_seconds: float
    seed: int
    split_seed: int
    test_fraction: float
    config: dict = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    data_report: str = ""                          # the release's data report (release/data_report.py), markdown


def format_cost(cost: float | None) -> str:
    return "unknown" if cost is None else f"${cost:,.4f}"


def total_cost(usage: Mapping[str, Mapping]) -> float | None:
    """Sum of the stages' costs; None (unknown) when any stage's cost is unknown or nothing was reported."""
    if not usage:
        return None
    costs = [u.get("cost_usd") for u in usage.values()]
    return None if any(c is None for c in costs) else float(sum(costs))


def total_tokens(usage: Mapping[str, Mapping]) -> dict[str, int]:
    return {k: int(sum(int(u.get(k) or 0) for u in usage.values())) for k in ("prompt_tokens", "completion_tokens")}


def simulated(facts: CardFacts) -> bool:
    """Whether the build's endpoint was the loopback simulator: a stage model is the simulator's, or the
    endpoint is the simulator URL the command that started it named (simulator/server.py)."""
    from facets.simulator.server import SIMULATED_URL_ENV

    base_url = (facts.config.get("endpoint") or {}).get("base_url")
    return SIMULATOR_MODEL in facts.models.values() or bool(base_url and base_url == os.environ.get(SIMULATED_URL_ENV))


def redact(value: Any) -> Any:
    """The config as recorded: values under secret-looking keys are hidden."""
    if isinstance(value, Mapping):
        return {k: ("<redacted>" if _SECRET.search(str(k)) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def _size_category(rows: int) -> str:
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if rows < bound:
            return name
    return "1M<n<10M"


def front_matter(splits: Mapping[str, Mapping[str, int]], rows: int) -> dict:
    configs = []
    for name, parts in splits.items():
        entry: dict[str, Any] = {"config_name": name}
        if name == "sft":
            entry["default"] = True
        entry["data_files"] = [{"split": split, "path": f"{name}/{split}-*.parquet"} for split in parts]
        configs.append(entry)
    return {
        "pretty_name": "Multifaceted Collection (rebuilt)",
        "language": ["en"],
        "license": "cc-by-4.0",  # the published collection's; the card's "Licence" section says what else applies
        "task_categories": ["text-generation"],
        "tags": ["preference", "system-message", "alignment", "dpo", "orpo", "reward-modeling", "synthetic"],
        "size_categories": [_size_category(rows)],
        "configs": configs,
    }


# The instruction sources' own terms, as their cards state them (checked where a card could be read).
SOURCE_TERMS = {
    "Nectar": "apache-2.0 on its current card, on the condition that it is not used to compete with OpenAI "
              "(earlier revisions: cc-by-nc-4.0)",
    "OpenHermesPreferences": "`other` on its card: read the card's licence notes",
    "ultrafeedback_binarized_cleaned": "mit",
    "chatbot_arena_conversations": "not confirmed here; its card is believed to give user prompts under cc-by-4.0 "
                                   "and model outputs under cc-by-nc-4.0",
    "domain_specific_preference": "cc-by-nc-4.0 (the DATA_LICENSE file of its repository)",
}


def licence_section(facts: "CardFacts") -> list[str]:
    """What applies to what: the collection's licence, the generated text, and each source's instructions."""
    models = ", ".join(sorted(set(facts.models.values()))) or "the configured models"
    out = ["## Licence", "",
           "The published Multifaceted Collection is released under CC BY 4.0, and this card says the same of this "
           "rebuild's layout and selection. The generated text (preference trees, system messages, responses) was "
           f"written by {models}: the terms of that model's provider apply to it as well. The instructions keep "
           "the terms of the dataset each came from:", ""]
    out += [markdown_table(["main_source", "terms of the source"],
                   [(source, SOURCE_TERMS.get(source, "a source of your own: its own terms")) for source, _, _ in
                    facts.sources]), ""]
    return out


def fidelity_section(config: dict[str, Any]) -> list[str]:
    """The settings of this build that differ from the paper's, both values side by side."""
    if not config:
        return []
    out = ["## Fidelity", ""]
    rows = differences(config)
    if rows:
        out += ["Settings of this build that differ from the paper's (`--profile paper` builds with the paper's):", ""]
        out += [markdown_table(["setting", "this build", "the paper"], rows), ""]
    else:
        out += ["This build used every setting of the paper that is known.", ""]
    out += [f"- {note}" for note in unknowns(config)] + [""]
    return out


def render_card(facts: CardFacts) -> str:
    sft_rows = sum(facts.splits.get("sft", {}).values())
    head = yaml.safe_dump(front_matter(facts.splits, sft_rows), sort_keys=False, allow_unicode=True)
    out: list[str] = ["---", head.rstrip("\n"), "---", ""]
    out += [f"# Multifaceted Collection, release `{facts.version}`", ""]
    if simulated(facts):
        out += ["> **Simulated text.** This release was built against facets' loopback simulator, not a language "
                "model: its preference trees, system messages and responses are generated filler, made for trying "
                "the pipeline. Do not train on it.", ""]
    out += [f"A rebuild of the Multifaceted Collection ({PAPER}). Each instruction has several preference sets "
            "(one preference for each of the dimensions style, background knowledge, informativeness and "
            "harmlessness), a system message per set that weaves its preferences together, and a gold response "
            f"per system message. {facts.instructions:,} instructions are in this release.", ""]

    out += ["## Subsets", ""]
    out += [markdown_table(["config", "layout", "train", "test"],
                   [(f"`{name}`", LAYOUTS.get(name, ""), f"{parts.get('train', 0):,}",
                     f"{parts['test']:,}" if "test" in parts else "")
                    for name, parts in facts.splits.items()]), ""]
    out += ["```python", "from datasets import load_dataset", "",
            'sft = load_dataset("parquet", data_dir="sft")            # from a copy of this folder',
            'rm = load_dataset("parquet", data_dir="rm")              # splits train and test',
            '# from the hub: load_dataset("<repo>", "dpo")', "```", ""]

    out += ["## Preference hierarchy", ""]
    out += ["[Interactive sunburst](sunburst.html) (a self-contained page: open it in a browser, no network needed) "
            "of dimension, subdimension and preference over this release's preference sets; the most frequent "
            "subdimensions and preferences are shown, the rest gathered under \"(other)\".", ""]
    out += ["![Sunburst of dimension, subdimension and preference](sunburst.png)", ""]
    if facts.nodes:
        total = sum(n.value for n in facts.nodes if n.depth == 1) or 1
        rows = []
        for dim in (n for n in facts.nodes if n.depth == 1):
            subs = [n for n in facts.nodes if n.parent == dim.id]
            rows.append((dim.label, f"{100 * dim.value / total:.1f}%",
                         ", ".join(f"{s.label} ({s.value:,})" for s in subs[:6])))
        out += [markdown_table(["dimension", "share", "most frequent subdimensions (preferences)"], rows), ""]

    out += ["## Sources", ""]
    out += [markdown_table(["main_source", "instructions", "SFT rows"],
                   [(s, f"{i:,}", f"{r:,}") for s, i, r in facts.sources]), ""]

    out += ["## Stages", ""]
    out += ["Rows of the build that produced this release. Rows of earlier builds (other fingerprints) and rows "
            "written twice by a retried shard are ignored.", ""]
    out += [markdown_table(["stage", "rows expected", "rows found", "rows of other builds ignored", "duplicate rows ignored"],
                   [(s["stage"], f"{s['expected']:,}", f"{s['found']:,}", f"{s['stale']:,}", f"{s['duplicates']:,}")
                    for s in facts.stages]), ""]
    left = sum(facts.left_out.values())
    if left:
        out += [f"Left out of this release because a stage row was missing: {left:,} "
                f"instruction{'s' if left != 1 else ''} of the build.", ""]
        out += [markdown_table(["reason", "instructions"], [(r, f"{n:,}") for r, n in sorted(facts.left_out.items())]), ""]
    else:
        out += ["No instruction of the build was left out.", ""]

    out += ["## Failures", ""]
    if facts.failures:
        out += ["Rows that could not be produced (all builds in this data directory), by stage and reason; "
                "the failed instructions are not in the release.", ""]
        out += [markdown_table(["stage", "reason", "rows"], [(s, r, f"{n:,}") for s, r, n in facts.failures]), ""]
    else:
        out += ["None recorded.", ""]

    if facts.data_report:  # its own sections, one level down, after its title
        out += ["## Data report", "", "Diversity, coverage and lengths of this release (`facets report` makes it again, "
                "with other samples); also in [report/](report/README.md).", ""]
        body = facts.data_report.split("\n", 1)[1] if facts.data_report.startswith("# ") else facts.data_report
        out += [line.replace("## ", "### ", 1) if line.startswith("## ") else line for line in body.splitlines()] + [""]
    out += fidelity_section(facts.config)
    out += licence_section(facts)

    out += ["## Models and prompts", ""]
    stages = list(dict.fromkeys([*facts.models, *facts.prompt_versions]))
    out += [markdown_table(["stage", "model", "prompt version"],
                   [(s, facts.models.get(s, ""), facts.prompt_versions.get(s, "")) for s in stages]), ""]
    if dialect := (facts.config.get("endpoint") or {}).get("structured_output"):
        out += [f"Structured output was asked for as `{dialect}`.", ""]

    out += ["## Usage and cost", ""]
    if facts.usage:
        rows = [(s, f"{int(u.get('requests') or 0):,}", f"{int(u.get('prompt_tokens') or 0):,}",
                 f"{int(u.get('completion_tokens') or 0):,}", f"{int(u.get('rate_limited') or 0):,}",
                 format_cost(u.get("cost_usd"))) for s, u in facts.usage.items()]
        tokens = total_tokens(facts.usage)
        rows.append(("**total**", f"{sum(int(u.get('requests') or 0) for u in facts.usage.values()):,}",
                     f"{tokens['prompt_tokens']:,}", f"{tokens['completion_tokens']:,}",
                     f"{sum(int(u.get('rate_limited') or 0) for u in facts.usage.values()):,}",
                     format_cost(total_cost(facts.usage))))
        out += [markdown_table(["stage", "requests", "prompt tokens", "completion tokens", "rate limited (429)", "cost (USD)"], rows), ""]
        out += ["Usage of the build run that published this release (an incremental run counts only the calls "
                "it made). A cost is unknown when a model's price is not known.", ""]
    else:
        out += ["Cost: unknown (no usage was reported).", ""]

    out += ["## Build", ""]
    out += [f"- build time: {facts.build_seconds:,.1f} s",
            f"- seed: {facts.seed}",
            f"- RM test split: {facts.splits.get('rm', {}).get('test', 0):,} of {sum(facts.splits.get('rm', {}).values()):,} "
            f"pairs ({facts.test_fraction:.2%} asked, at least one pair when there are two or more), seed {facts.split_seed}",
            f"- content hash: `{facts.content_hash}` (the release version derives from the datasets' content)",
            "- `manifest.json` lists every file with its rows and sha256", ""]
    if facts.config:
        out += ["<details><summary>Build config</summary>", "", "```json",
                json.dumps(redact(facts.config), indent=2, sort_keys=True, default=str), "```", "", "</details>", ""]

    out += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(out)
