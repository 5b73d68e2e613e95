"""Throwaway PostgreSQL databases for tests and benches that run a Prefect server of their own."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

HOST = "127.0.0.1"


def scratch_database(host: str = HOST, port: int = 5432, user: str = "postgres") -> tuple[str, Callable[[], None]]:
    """A fresh database on a PostgreSQL server, for a throwaway Prefect server (tests, benches): its
    SQLAlchemy URL and a function that drops it. OSError or asyncpg.PostgresError when unreachable."""
    import uuid

    import asyncpg

    name = f"facets_scratch_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(database="postgres", timeout=10, host=host, port=port, user=user)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    return (f"postgresql+asyncpg://{user}@{host}:{port}/{name}",
            lambda: asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))
