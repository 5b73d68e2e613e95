"""The stages of a build, declared once (docs/ARCHITECTURE.md, "Stages").

A stage's name is the one name of its concept everywhere: its module `tasks/<name>.py` (whose `run` makes
its rows), its table `stages/<name>/` and catalog view, its prompt template `prompts/<name>.txt`, its key
under `stages:` in a build config, its row in the release card. Every list of stages, the fingerprint
chain, the runners and the card derive from `STAGES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from facets.schemas.records import GoldResponse, Pair, PreferenceSet, PreferenceTree, SystemMessage

# How many rows a stage makes per instruction: one, one per preference set, or one pair.
RowsPerInstruction = Literal["one", "per_set", "pair"]


@dataclass(frozen=True)
class Stage:
    name: str
    row: type[BaseModel]
    reads: str | None                    # the stage whose rows it takes; None: the instructions
    rows: RowsPerInstruction
    max_tokens: int | None = None        # an LLM stage's default max_tokens (decision 9); None: no LLM call
    chosen_by: tuple[str, ...] = ()      # a stage without a call: the build settings its seeded choice depends on
    typical_tokens: int = 0              # a typical reply's length in the published collection (for estimates)
    prompt_settings: tuple[str, ...] = ()  # build settings that change its prompt (besides template, model, sampling)

    @property
    def calls_llm(self) -> bool:
        return self.max_tokens is not None

    @property
    def template(self) -> str | None:
        """The prompt template file's name (without `.txt`), for a stage that makes calls."""
        return self.name if self.calls_llm else None


# Typical replies: trees as JSON with three or more branches per dimension; system messages ~1,000
# characters; gold responses ~2,300 characters.
STAGES: tuple[Stage, ...] = (
    Stage("preference_trees", PreferenceTree, reads=None, rows="one", max_tokens=2048, typical_tokens=1400),
    Stage("preference_sets", PreferenceSet, reads="preference_trees", rows="per_set",
          chosen_by=("seed", "sets_per_instruction")),
    Stage("system_messages", SystemMessage, reads="preference_sets", rows="per_set", max_tokens=2048,
          typical_tokens=250, prompt_settings=("system_message_from",)),
    Stage("responses", GoldResponse, reads="system_messages", rows="per_set", max_tokens=4096, typical_tokens=600),
    Stage("pairs", Pair, reads="responses", rows="pair", chosen_by=("seed",)),
)
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
LLM_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.calls_llm)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
# A bench item goes through the build's stages up to its reference answer (no pairs), then gets a rubric
# (evaluation/rubrics.py).
BENCH_RUBRICS = "bench_rubrics"
BENCH_STAGES: tuple[str, ...] = (*(stage.name for stage in STAGES if stage.rows != "pair"), BENCH_RUBRICS)
