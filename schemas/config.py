"""Run configuration for LLM calls: one endpoint, its limits, retries and per-stage sampling."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

DEFAULT_BASE_URL = "https://api.openai.com/v1"


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    max_in_flight: int = Field(64, gt=0)
    burst_s: float = Field(1.0, gt=0, description="seconds of budget that may go out at once")


class Retries(Config):
    max_attempts: int = Field(8, ge=1)
    timeout_s: float = Field(120.0, gt=0, description="one HTTP attempt")
    deadline_s: float = Field(900.0, gt=0, description="one call, all attempts and waits included")
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(60.0, gt=0)


class EndpointConfig(Config):
    """Where calls go. Key and URL default to the openai client's own variables."""

    base_url: str | None = None
    api_key: SecretStr | None = None
    model: str = "gpt-4o-mini"
    limits: RateLimits = Field(default_factory=RateLimits)
    retries: Retries = Field(default_factory=Retries)
    transport: Literal["lean", "openai"] = "lean"
    max_cost: float | None = Field(None, gt=0, description="hard spend cap in USD, checked before each call")
    prices: dict[str, tuple[float, float, float]] = Field(
        default_factory=dict, description="model -> (input, cached input, output) USD per 1M tokens"
    )
    max_failure_rate: float = Field(0.5, gt=0, le=1, description="early stop above this share of failed calls")
    failure_window: int = Field(50, ge=5, description="calls looked at for the early stop")

    @model_validator(mode="after")
    def _from_environment(self) -> "EndpointConfig":
        if self.base_url is None:
            self.base_url = os.environ.get("OPENAI_BASE_URL") or None
        if self.api_key is None and os.environ.get("OPENAI_API_KEY"):
            self.api_key = SecretStr(os.environ["OPENAI_API_KEY"])
        return self

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URL).rstrip("/")
