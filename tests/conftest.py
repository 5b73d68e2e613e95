import os
import tempfile

import pytest

# Prefect's telemetry needs network; tests run offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Local copies of object-store tables (storage/mirror.py) go to a folder of the test run, not ~/.cache.
os.environ.setdefault("FACETS_CACHE_DIR", tempfile.mkdtemp(prefix="facets-test-cache-"))

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis, for the tests of one limit shared by processes; they skip where none answers."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"needs Redis at {REDIS_URL}, which does not answer here ({exc})")
    return REDIS_URL
