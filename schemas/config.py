"""Run configuration for LLM calls: one endpoint, its limits, retries and per-stage sampling."""
from __future__ import annotations

import os
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from facets.schemas.stages import LLM_STAGES, STAGES

DEFAULT_BASE_URL = "https://api.openai.com/v1"
QUOTA_GROUP = re.compile(r"^[\w.-]+(/[^/]+)?$")
# 2 MiB: a 4096-token reply is about 16 KiB of text, a hundred times over even with n > 1 and JSON escapes
DEFAULT_MAX_REPLY_BYTES = 2 * 1024 * 1024


class Config(BaseModel):
    # an error names the field and the rule, never the value: a refused base_url holds a password
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class Sampling(Config):
    """Generation parameters; all of them enter the journal key."""

    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(2048, gt=0)
    seed: int | None = None
    n: int = Field(1, ge=1)

    def request_fields(self) -> dict[str, object]:
        return self.model_dump(exclude_none=True)


class RateLimits(Config):
    """The endpoint's published limits per (endpoint, model); 0 means not limited on that axis."""

    rpm: float = Field(500, ge=0)
    tpm: float = Field(0, ge=0, description="input + output tokens per minute")
    itpm: float = Field(0, ge=0, description="input tokens per minute")
    otpm: float = Field(0, ge=0, description="output tokens per minute")
    max_in_flight: int | None = Field(
        None, gt=0, description="requests sent and unanswered at most; unset: the RPM times the latency seen, "
                                "8 to 512 (64 with no RPM)")
    burst_s: float = Field(1.0, gt=0, description="seconds of budget that may go out at once")
    share_via: str | None = Field(
        None, description="redis://HOST:PORT/DB: the processes calling this endpoint take these limits from "
                          "one token bucket there, as they need them (many workers, one budget)")


class Retries(Config):
    max_attempts: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0, description="one HTTP attempt")
    deadline_s: float = Field(900.0, gt=0, description="one call, all attempts and waits included")
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)


def config_error(exc: Exception) -> str:
    """A refused config in one line: each error's field and message (no values, see `Config`)."""
    if not isinstance(exc, ValidationError):
        return str(exc)
    return "; ".join(("{}: ".format(".".join(map(str, e["loc"]))) if e["loc"] else "")
                     + e["msg"].removeprefix("Value error, ") for e in exc.errors())


def refuse_credentials(url: str | None, name: str) -> None:
    """A URL with user:password@ would land, password included, in flow-run parameters and logs."""
    if url and "@" in url and urlsplit(url).username is not None:
        raise ValueError(f"{name} must not carry credentials (user:password@host): give the key in "
                         "OPENAI_API_KEY (or api_key) and the URL without them")


class EndpointConfig(Config):
    """Where calls go. Key and URL default to the openai client's own variables."""

    base_url: str | None = None
    api_key: SecretStr | None = None
    model: str = "gpt-4o-mini"
    limits: RateLimits = Field(default_factory=RateLimits)
    retries: Retries = Field(default_factory=Retries)
    transport: Literal["lean", "openai"] = "lean"
    structured_output: Literal["auto", "json_schema", "json_object", "guided_json", "prompt"] = Field(
        "auto", description="how structured calls ask for JSON: a strict json_schema response format (OpenAI, "
                            "vLLM, Ollama, llama.cpp's server), json_object with a schema (llama-cpp-python), "
                            "vLLM's guided_json, or the schema in the prompt; auto: the first of these that a "
                            "tiny probe call shows the endpoint answers, before any paid work")
    max_cost: float | None = Field(None, gt=0, description="hard spend cap in USD, checked before each call")
    prices: dict[str, tuple[float, float, float]] = Field(
        default_factory=dict, description="model -> (input, cached input, output) USD per 1M tokens"
    )
    max_failure_rate: float = Field(0.5, gt=0, le=1, description="early stop above this share of failed calls")
    failure_window: int = Field(50, ge=5, description="calls looked at for the early stop")
    stall_s: float = Field(120.0, gt=0, description="early stop when no reply was accepted for this long while "
                                                     "attempts kept failing (429s without end, 5xx, bad bodies)")
    max_reply_bytes: int = Field(
        DEFAULT_MAX_REPLY_BYTES, ge=64 * 1024,
        description="a reply body larger than this is not read further and fails that call (reply_too_large)")
    context_window: int | None = Field(
        None, gt=0, description="tokens of prompt plus max_tokens the models take; unset: known from the model id "
                                "for common models, else not checked")

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, value: str | None) -> str | None:
        refuse_credentials(value, "base_url")
        return value

    @model_validator(mode="after")
    def _from_environment(self) -> "EndpointConfig":
        if self.base_url is None:
            self.base_url = os.environ.get("OPENAI_BASE_URL") or None
            refuse_credentials(self.base_url, "OPENAI_BASE_URL")
        if self.api_key is None and os.environ.get("OPENAI_API_KEY"):
            self.api_key = SecretStr(os.environ["OPENAI_API_KEY"])
        return self

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URL).rstrip("/")


LLMStage = Literal[LLM_STAGES]  # the names of the stages that make calls (schemas/stages.py)


class StageSettings(Config):
    """Model and sampling of one LLM stage; `model` None means the endpoint's model."""

    model: str | None = None
    sampling: Sampling = Field(default_factory=Sampling)


def _default_stages() -> dict[str, StageSettings]:
    # docs/ARCHITECTURE.md, decision 9: the paper published none for these stages; trees and system messages 2048, responses 4096
    return {stage.name: StageSettings(sampling=Sampling(max_tokens=stage.max_tokens)) for stage in STAGES if stage.calls_llm}


class TrainAfter(Config):
    """The training run a build starts when it publishes a new release: a run of the `train` deployment."""

    deployment: str = Field("train/sft", description="FLOW/DEPLOYMENT, as prefect.yaml declares it")
    config: dict[str, Any] = Field(
        default_factory=lambda: {"method": "sft"},
        description="TrainConfig fields except `release` (the new release); `output_dir` defaults to "
                    "<data_dir>/models/<version>-<method>")

    @model_validator(mode="after")
    def _valid_train_config(self) -> "TrainAfter":
        from facets.schemas.training import TrainConfig

        if "/" not in self.deployment:
            raise ValueError(f"train_after.deployment must be FLOW/DEPLOYMENT, not {self.deployment!r}")
        if "release" in self.config:
            raise ValueError("train_after.config must not name a release: the build passes the one it published")
        TrainConfig.model_validate({"output_dir": "-", **self.config, "release": "-"})
        return self

    def train_config(self, release_path: str, version: str, data_dir: str) -> dict[str, Any]:
        method = self.config.get("method", "sft")
        output_dir = self.config.get("output_dir") or f"{data_dir.rstrip('/')}/models/{version}-{method}"
        return {**self.config, "release": release_path, "output_dir": output_dir}


class BuildConfig(Config):
    """Everything a `build-collection` run needs; the CLI flags and the deployment parameters mirror it."""

    sources: list[str] = Field(default_factory=list, description="NAME=PATH_OR_HUB_ID, ingested before the build")
    limit: int | None = Field(None, ge=1, description="accepted instructions wanted (docs/ARCHITECTURE.md, decision 8); None = all")
    seed: int = 0
    shard_size: int = Field(256, gt=0, description="instructions per shard, roughly (shards are bucket ranges)")
    sets_per_instruction: int = Field(3, ge=2, le=8)
    quotas: dict[str, int | None] = Field(
        default_factory=dict,
        description="the source mix: instructions per source (`nectar`) or per original source of one "
                    "(`nectar/anthropic-hh`, `openhermes/-` for rows with none); null = count unknown, drawn "
                    "after the known ones to fill `limit` (pipeline/selection.py)")
    system_message_from: Literal["preferences", "descriptions"] = Field(
        "preferences", description="what the system-message prompt shows of each preference: all of it "
                                   "(dimension, subdimension, keyword, description) or only its description, "
                                   "as the published collection's card says")
    profile: str | None = Field(None, description="the named profile this config started from (`--profile`)")
    max_concurrent_shards: int = Field(8, gt=0)
    max_tree_shards: int = Field(1, gt=0, description="shards making preference trees at once; the others go on "
                                                     "with later stages, so token-heavy and request-heavy calls mix")
    shard_retries: int = Field(2, ge=0, description="Prefect retries of a crashed (stage, shard) task; with "
                                                   "shard_deployment, also new runs of a shard whose worker died")
    shard_deployment: str | None = Field(
        None, description="FLOW/DEPLOYMENT of the build-shard flow (build-shard/default): every shard runs as a "
                          "flow run of it, taken by the workers of its pool, so many machines share one build "
                          "(the data dir must be one they all reach, e.g. s3://). Unset: shards run in this process")
    stages: dict[LLMStage, StageSettings] = Field(default_factory=_default_stages)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    mode: Literal["online", "batch"] = "online"
    batch_poll_s: float = Field(30.0, gt=0, description="first wait before polling a batch; it grows from there")
    data_dir: str = "data"
    wait_for_lock: bool = Field(False, description="another build holds the data dir: wait for it to end "
                                                   "(unset: stop at once, naming it)")
    lock_wait_s: float | None = Field(None, gt=0, description="with wait_for_lock, give up after this long; "
                                                               "unset: wait as long as it takes")
    templates_dir: str | None = Field(None, description="a directory whose <stage>.txt files replace the bundled prompts")
    test_fraction: float = Field(0.005, ge=0, lt=1, description="share of pairs in the RM test split")
    publish: bool = True
    push_to_hub: str | None = Field(None, description="a hub dataset repo id to push a new release to")
    train_after: bool = Field(False, description="start the `train` deployment on a new release (see `train`)")
    train: TrainAfter = Field(default_factory=TrainAfter)

    @model_validator(mode="before")
    @classmethod
    def _from_profile(cls, data: Any) -> Any:
        """A config naming a profile starts from the profile's file (schemas/profiles/)."""
        if isinstance(data, dict) and data.get("profile"):
            from facets.schemas.profiles import load_profile, merged

            return merged(load_profile(data["profile"]), data)
        return data

    @model_validator(mode="after")
    def _every_stage(self) -> "BuildConfig":
        if self.shard_deployment is not None and "/" not in self.shard_deployment:
            raise ValueError(f"shard_deployment must be FLOW/DEPLOYMENT, not {self.shard_deployment!r}")
        defaults = _default_stages()
        self.stages = {name: self.stages.get(name, defaults[name]) for name in LLM_STAGES}
        for group, count in self.quotas.items():
            if not QUOTA_GROUP.match(group):
                raise ValueError(f"quotas: {group!r} is not SOURCE or SOURCE/ORIGINAL_SOURCE")
            if count is not None and count < 0:
                raise ValueError(f"quotas: {group} must be >= 0 or null (unknown), not {count}")
        return self

    def model_of(self, stage: str) -> str:
        return self.stages[stage].model or self.endpoint.model

    def is_small(self, instructions: int) -> bool:
        """A shard this small (the replacements drawn for failed instructions) starts at once, beside the
        others, in the build's own process: waiting for a shard or tree slot, or for a worker, would end
        the build with a chain of tiny shards."""
        return instructions < max(1, self.shard_size // 4)
