import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

# Prefect's telemetry needs network; tests run offline.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_TELEMETRY_ENABLED", "false")
# Local copies of object-store tables (storage/mirror.py) go to a folder of the test run, not ~/.cache.
os.environ.setdefault("FACETS_CACHE_DIR", tempfile.mkdtemp(prefix="facets-test-cache-"))

REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture
def redis_url() -> str:
    """The machine's Redis, for the tests of one limit shared by processes; they skip where none answers."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.exceptions.RedisError as exc:
        pytest.skip(f"needs Redis at {REDIS_URL}, which does not answer here ({exc})")
    return REDIS_URL


@pytest.fixture
def postgres() -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL, for a Prefect server of the test's own: its SQLAlchemy
    URL, dropped after the test. Skips where no PostgreSQL answers."""
    import asyncpg

    from facets.testing.postgres import scratch_database

    where = f"{POSTGRES['host']}:{POSTGRES['port']}"
    try:
        with socket.create_connection((POSTGRES["host"], POSTGRES["port"]), timeout=2):
            pass
    except OSError as exc:
        pytest.skip(f"needs PostgreSQL at {where}, which does not answer here ({exc})")
    try:
        url, drop = scratch_database(**POSTGRES)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"needs PostgreSQL at {where} that lets {POSTGRES['user']} create a database ({exc})")
    try:
        yield url
    finally:
        drop()


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One temporary Prefect server (SQLite) for every test that runs flows in this process; its API URL.

    Started once, on first use, and set as the API of this process until the run ends. Tests keep apart by
    what they read back (their own flow run, names, start times), never by a fresh server."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(params=["lean", "openai"])
def transport(request) -> str:
    """The gateway's two transports: our lean one and the openai client."""
    return request.param
