"""Checks an endpoint before a run spends anything: reachable, key accepted, every model served.

A bad key, a typo in a model name or a dead URL should stop a build in a second with one clear line,
not after thousands of failed calls.
"""
from __future__ import annotations

from facets.llm.errors import EndpointUnreachable, FatalEndpointError, MissingCredentials
from facets.llm.gateway import SIMULATOR_HINT
from facets.schemas.config import EndpointConfig


def check_share(url: str) -> None:
    """The Redis that splits the limits among workers answers, or nothing is sent."""
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=5).ping()
    except (redis.exceptions.RedisError, ValueError) as exc:
        raise FatalEndpointError(f"share_via: no Redis answers at {url} ({exc}); the workers could not "
                                 "share the endpoint's limits, so nothing was sent") from None


async def check_endpoint(endpoint: EndpointConfig, models: list[str]) -> list[str] | None:
    """The models the endpoint lists (None when it lists none); raises `RunAborted` subclasses."""
    import openai  # here, not at the top: a shard run on a worker never checks and skips its 1-2 s import

    if endpoint.api_key is None and endpoint.base_url is None:
        raise MissingCredentials(f"no endpoint configured: set OPENAI_API_KEY to call OpenAI, {SIMULATOR_HINT}")
    if endpoint.limits.share_via:
        check_share(endpoint.limits.share_via)
    key = endpoint.api_key.get_secret_value() if endpoint.api_key else "unused"
    client = openai.AsyncOpenAI(base_url=endpoint.url, api_key=key, max_retries=2, timeout=min(30.0, endpoint.retries.timeout_s))
    try:
        served = [m.id async for m in client.models.list()]
    except openai.AuthenticationError as exc:
        raise FatalEndpointError(f"{endpoint.url} rejected the API key (401): check OPENAI_API_KEY ({exc.message})") from None
    except openai.PermissionDeniedError as exc:
        raise FatalEndpointError(f"{endpoint.url} refused access (403): {exc.message}") from None
    except (openai.NotFoundError, openai.UnprocessableEntityError):
        return None  # a server without a model list: the first call will tell
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        raise EndpointUnreachable(f"{endpoint.url} could not be reached ({exc}); check OPENAI_BASE_URL, {SIMULATOR_HINT}") from None
    except openai.APIStatusError as exc:
        raise EndpointUnreachable(f"{endpoint.url} answered {exc.status_code} to GET /models: {exc.message}") from None
    finally:
        await client.close()
    unknown = sorted(set(models) - set(served))
    if served and unknown:
        listed = ", ".join(served[:12]) + (" ..." if len(served) > 12 else "")
        raise FatalEndpointError(f"{endpoint.url} does not serve {', '.join(map(repr, unknown))}; it serves: {listed}")
    return served
