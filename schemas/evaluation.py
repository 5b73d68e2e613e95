"""The Multifaceted Bench and its evaluation: configs of `build-bench` and `evaluate`, and their records.

Bench items go through the build's own stages (trees, one preference set, system message, gold response
as the reference answer); the one stage of the bench alone, rubrics, stores `BenchRubric` rows. An
evaluation stores one `EvalResponse` per (model, bench item) and one `Judgment` per (model, item, run,
rubric), each with the fingerprint of what produced it, so a rerun makes only what is missing.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from facets.schemas.config import (
    LLM_STAGES,
    BuildConfig,
    Config,
    EndpointConfig,
    LLMStage,
    RateLimits,
    Retries,
    Sampling,
    StageSettings,
    _default_stages,
    refuse_credentials,
)
from facets.schemas.records import Dimension, StageRecord
from facets.schemas.release import ScoreDescriptions

# The five benchmarks: source name (as `--source NAME=PATH` takes it) -> the column of the paper's Table 2.
BENCHMARKS: dict[str, str] = {
    "alpaca_eval": "mf-AlpacaEval",
    "flask": "mf-FLASK",
    "koala": "mf-Koala",
    "mt_bench": "mf-MT-Bench",
    "self_instruct": "mf-Self-Instruct",
}
# Paper: gpt-4-0125-preview wrote the references and rubrics and judged (absolute 1-5, Prometheus style).
JUDGE_MODEL = "gpt-4-0125-preview"
# The paper's inference script samples open models with this repetition penalty (vLLM); OpenAI models without.
PAPER_REPETITION_PENALTY = 1.03
OPEN_FORMATS = ("mistral", "chat")
NO_SYSTEM_SUFFIX = " (no system message)"
MAX_BEST_OF = 128  # answers one request may ask for (`n`), as OpenAI-compatible servers allow
PromptFormat = Literal["mistral", "chat", "openai"]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class GenerationSampling(Sampling):
    """The paper's settings for a model under test and for the judge: 1024 tokens, temperature 1.0, top_p 0.9
    (a config that names only some fields keeps these defaults for the others)."""

    max_tokens: int = Field(1024, gt=0)
    repetition_penalty: float | None = Field(None, gt=0, description="sent only when set (open models' servers)")


def generation_sampling() -> GenerationSampling:
    return GenerationSampling()


# -- records -------------------------------------------------------------------------------------------
class BenchRubric(StageRecord):
    """One rubric per preference of a bench item's set; `set_index` is the preference's position in the
    set (dimension order: style, background_knowledge, informativeness, harmlessness)."""

    set_index: int = Field(ge=0, le=3)
    dimension: Dimension
    criteria: str = Field(min_length=1)
    score_descriptions: ScoreDescriptions
    model: str
    prompt_version: str


class EvalRecord(BaseModel):
    """Model outputs are kept byte for byte: no whitespace stripping."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EvalResponse(EvalRecord):
    """A model's response to one bench item."""

    item_id: str = Field(min_length=1)          # instruction id of the bench prompt
    model: str = Field(min_length=1)            # the label the summary shows
    bench_version: str
    benchmark: str                              # a key of BENCHMARKS
    source: str                                 # the bench row's `source`
    prompt_format: str
    text: str
    finish_reason: str                          # "stop", or "length" when cut at max_tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fingerprint: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=_utcnow)


class BestOfCandidate(EvalRecord):
    """One of the N answers sampled for a bench item under best-of-N, with its reward-model score; the
    kept one is the item's `EvalResponse` (same `response_fingerprint`). Stored beside the responses, so
    their layout stays the judge's."""

    item_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    bench_version: str
    response_fingerprint: str = Field(min_length=1)
    index: int = Field(ge=0)                    # the answer's place among the N
    text: str
    finish_reason: str
    score: float                                # the reward model's
    kept: bool                                  # the best score (the first of equals)
    reward_model: str
    created_at: datetime = Field(default_factory=_utcnow)


class Judgment(EvalRecord):
    """One judge call: a response graded on one rubric in one run, with the judge's feedback."""

    item_id: str = Field(min_length=1)
    model: str = Field(min_length=1)
    bench_version: str
    benchmark: str
    source: str
    run: int = Field(ge=0)
    rubric_index: int = Field(ge=0, le=3)
    score: int = Field(ge=1, le=5)
    feedback: str
    judge_model: str
    response_fingerprint: str
    fingerprint: str = Field(min_length=1)
    created_at: datetime = Field(default_factory=_utcnow)


# -- configs -------------------------------------------------------------------------------------------
def _rubric_settings() -> StageSettings:
    # the paper's rubric generation: max_tokens 1024, temperature 1.0, top_p 0.9, JSON output
    return StageSettings(sampling=Sampling(max_tokens=1024))


class BenchConfig(Config):
    """Everything a `build-bench` run needs; `facets bench build` flags mirror it."""

    sources: list[str] = Field(default_factory=list, description="NAME=PATH, NAME one of " + ", ".join(BENCHMARKS))
    per_benchmark: int | dict[str, int] | None = Field(
        None, description="items drawn per benchmark (seeded): one count for all, or a count per benchmark "
                          "(`--target-counts` reads the published bench's); None = all")
    seed: int = 0
    data_dir: str = "data"
    against: list[str] = Field(default_factory=list,
                               description="more data dirs whose training prompts the bench must not contain")
    shard_size: int = Field(256, gt=0)
    max_concurrent_shards: int = Field(8, gt=0)
    shard_retries: int = Field(2, ge=0)
    stages: dict[LLMStage, StageSettings] = Field(default_factory=_default_stages)
    rubrics: StageSettings = Field(default_factory=_rubric_settings)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    mode: Literal["online", "batch"] = "online"
    batch_poll_s: float = Field(30.0, gt=0)
    templates_dir: str | None = None
    publish: bool = True

    @field_validator("per_benchmark")
    @classmethod
    def _counts(cls, value):
        counts = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(n < 0 for n in counts) or (isinstance(value, int) and value < 1):
            raise ValueError("per_benchmark counts must be positive")
        unknown = set(value) - set(BENCHMARKS) if isinstance(value, dict) else set()
        if unknown:
            raise ValueError(f"per_benchmark names unknown benchmarks {sorted(unknown)}; known: {', '.join(BENCHMARKS)}")
        return value

    @model_validator(mode="after")
    def _every_stage(self) -> "BenchConfig":
        defaults = _default_stages()
        self.stages = {name: self.stages.get(name, defaults[name]) for name in LLM_STAGES}
        return self

    def build_config(self) -> BuildConfig:
        """The build's config for the shared stages (sets per instruction is the bench's own: one)."""
        return BuildConfig(seed=self.seed, data_dir=self.data_dir, shard_size=self.shard_size,
                           max_concurrent_shards=self.max_concurrent_shards, shard_retries=self.shard_retries,
                           stages=self.stages, endpoint=self.endpoint, mode=self.mode, batch_poll_s=self.batch_poll_s,
                           templates_dir=self.templates_dir, publish=False)

    def rubric_model(self) -> str:
        return self.rubrics.model or self.endpoint.model


class ModelSpec(Config):
    """A model under test: an OpenAI-compatible endpoint (OpenAI, a vLLM server) or a local transformers path.

    `prompt_format`: `openai` sends system and user messages; `chat` is the model's own chat template
    (endpoint: the server applies it to system + user, or to one user turn with the system message
    prepended when `system_role` is false; local: the tokenizer's template, falling back to the prepended
    user turn when the template has no system role); `mistral` is the raw text
    `[INST] {system}\\n{prompt} [/INST]` (endpoint: `/v1/completions`; local: tokenised as is).
    """

    name: str = Field(min_length=1, description="the model id the endpoint serves (a label for a local model)")
    label: str | None = Field(None, description="the name in the summary (default: name)")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint; None: OPENAI_BASE_URL or OpenAI")
    api_key: SecretStr | None = None
    api_key_env: str | None = Field(None, description="environment variable holding the key")
    local_model: str | None = Field(None, description="a local transformers model directory")
    prompt_format: PromptFormat = "openai"
    system_role: bool = True
    limits: RateLimits = Field(default_factory=RateLimits)
    retries: Retries = Field(default_factory=Retries)
    batch_size: int = Field(8, gt=0, description="local generation: prompts per forward batch")
    repetition_penalty: float | None = Field(
        None, gt=0, description=f"None: {PAPER_REPETITION_PENALTY} for open models (mistral, chat formats) as the paper, "
                                "none for openai; sent only where the server takes it")
    system_message: bool = Field(True, description="False: the item's prompt alone (the paper's no-system-message arm)")
    best_of: int = Field(1, ge=1, le=MAX_BEST_OF,
                         description="N answers sampled per item, the reward model's best one kept (the paper: 64 "
                                     "with Janus-RM); 1: one answer")
    reward_model: str | None = Field(None, description="best-of-N: a reward model directory "
                                                        "(`facets train --method rm`)")

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        refuse_credentials(value, "base_url")
        return value

    @model_validator(mode="after")
    def _one_place(self) -> "ModelSpec":
        if self.local_model and self.base_url:
            raise ValueError("a model is either served (base_url) or local (local_model), not both")
        if self.local_model and self.prompt_format == "openai":
            raise ValueError("a local model takes prompt_format mistral or chat (openai is for endpoints)")
        if self.best_of > 1 and not self.reward_model:
            raise ValueError(f"best_of {self.best_of} needs reward_model (--reward-model DIR): a reward model "
                             "directory trained with `facets train --method rm`")
        if self.reward_model and self.best_of == 1:
            raise ValueError("reward_model scores best-of-N answers: set best_of (--best-of N) above 1")
        return self

    @property
    def key(self) -> str:
        """The label, else the name with what sets the run apart: the no-system-message arm, best-of-N."""
        if self.label:
            return self.label
        return (self.name + ("" if self.system_message else NO_SYSTEM_SUFFIX)
                + (f" (best-of-{self.best_of})" if self.best_of > 1 else ""))

    def penalty(self) -> float | None:
        if self.repetition_penalty is not None:
            return self.repetition_penalty
        return PAPER_REPETITION_PENALTY if self.prompt_format in OPEN_FORMATS else None

    def sampling(self, base: Sampling) -> GenerationSampling:
        """The run's sampling with this model's repetition penalty and its N answers per item (`n`)."""
        fields = base.model_dump()
        fields["repetition_penalty"] = self.penalty()
        fields["n"] = self.best_of
        return GenerationSampling.model_validate(fields)

    def endpoint(self) -> EndpointConfig:
        """The endpoint config of a served model. A key is read from `api_key`, then `api_key_env`; with an
        explicit base_url and neither, none is sent (an OpenAI key never goes to another server)."""
        import os

        key = self.api_key
        if key is None and self.api_key_env:
            key = SecretStr(os.environ.get(self.api_key_env, ""))
        if key is None and self.base_url:
            key = SecretStr("EMPTY")
        return EndpointConfig(base_url=self.base_url, api_key=key, model=self.name, limits=self.limits,
                              retries=self.retries)


class JudgeEndpoint(EndpointConfig):
    """The judge's endpoint: the paper's judge model unless named."""

    model: str = JUDGE_MODEL


class JudgeConfig(Config):
    endpoint: EndpointConfig = Field(default_factory=JudgeEndpoint)
    sampling: Sampling = Field(default_factory=GenerationSampling)  # paper: 1024, 1.0, 0.9
    runs: int = Field(3, ge=1, description="full judge runs averaged (paper: 3)")
    reasks: int = Field(5, ge=0, description="an unparseable judge output is asked again this often")
    mode: Literal["online", "batch"] = "online"
    batch_poll_s: float = Field(30.0, gt=0)
    templates_dir: str | None = None

    @field_validator("endpoint", mode="before")
    @classmethod
    def _judge_model_default(cls, value):
        return JudgeEndpoint.model_validate(value) if isinstance(value, dict) else value

    @field_validator("sampling", mode="before")
    @classmethod
    def _sampling_defaults(cls, value):
        return GenerationSampling.model_validate(value) if isinstance(value, dict) else value


class EvalConfig(Config):
    """Everything an `evaluate` run needs; `facets eval` flags mirror it."""

    bench: str = Field("data", description="a bench folder, a release folder, or a data dir (its newest bench)")
    data_dir: str = "data"
    models: list[ModelSpec] = Field(default_factory=list)
    steps: list[Literal["generate", "judge"]] = Field(default_factory=lambda: ["generate", "judge"])
    generation: Sampling = Field(default_factory=GenerationSampling)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    limit: int | None = Field(None, ge=1, description="only the first N bench items (a smoke run)")
    seed: int = 0

    @field_validator("generation", mode="before")
    @classmethod
    def _generation_defaults(cls, value):
        return GenerationSampling.model_validate(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _best_of_samples(self) -> "EvalConfig":
        sampled = [m.key for m in self.models if m.best_of > 1]
        if sampled and self.generation.temperature == 0:
            raise ValueError(f"best-of-N ({', '.join(sampled)}) samples its N answers: temperature must be above 0")
        return self
