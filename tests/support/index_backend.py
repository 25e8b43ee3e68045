"""The index backend under test: SQLite (the default) or PostgreSQL.

- ``MIRROR_TEST_INDEX=postgres`` runs every ``MirrorProcess`` of the suite on a
  PostgreSQL index: ``mirror_index(config)`` adds ``index: {postgres: {dsn}}`` with a
  fresh database on a cluster started lazily, once per session (``shared_cluster``),
  and stopped at exit.
- ``index_config`` (fixture, parametrized ``sqlite`` / ``postgres``): an
  ``IndexConfig`` for tests of the index itself, a fresh database each time.
- ``rows(data_dir, config, sql)``: a query on whichever index a test's mirror uses,
  for tests that look into the index directly (SQLite's ``?`` placeholders are
  translated as the index does).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from mirror.config_scale import IndexConfig, PostgresConfig

from .postgres import PostgresCluster, pg_bin

__all__ = ["index_config", "index_of", "mirror_index", "rows", "shared_cluster", "using_postgres"]

_cluster: PostgresCluster | None = None


def using_postgres() -> bool:
    """Whether the suite runs on a PostgreSQL index (``MIRROR_TEST_INDEX=postgres``)."""
    return os.environ.get("MIRROR_TEST_INDEX", "sqlite") == "postgres"


def shared_cluster() -> PostgresCluster:
    """One cluster for the session (this process), started the first time it is asked
    for and stopped when the process exits."""
    global _cluster
    if _cluster is None:
        bin_dir = pg_bin()
        if bin_dir is None:
            pytest.fail("PostgreSQL is not installed (Debian: apt-get install postgresql)")
        _cluster = PostgresCluster(bin_dir).start()
        atexit.register(_cluster.stop)
    return _cluster


def new_dsn() -> str:
    cluster = shared_cluster()
    return cluster.dsn(cluster.new_database())


def mirror_index(config: dict) -> dict:
    """What MirrorProcess adds to a test's config: with ``MIRROR_TEST_INDEX=postgres``
    and no ``index`` of the test's own, a fresh PostgreSQL database."""
    if not using_postgres() or "index" in config:
        return {}
    return {"index": {"postgres": {"dsn": new_dsn()}}}


@pytest.fixture(params=["sqlite", "postgres"])
def index_config(request) -> IndexConfig:
    """Each index backend: SQLite in the test's data dir, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return IndexConfig()
    return IndexConfig(postgres=PostgresConfig(new_dsn()))


def index_of(config: dict) -> IndexConfig:
    """The IndexConfig of a MirrorProcess's config dict."""
    dsn = _dsn(config)
    return IndexConfig() if dsn is None else IndexConfig(postgres=PostgresConfig(dsn))


def rows(data_dir: Path, config: dict | IndexConfig | None, sql: str,
         args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """``sql`` on the index of a mirror whose config (a MirrorProcess's dict, or an
    IndexConfig) is ``config``, from synchronous test code."""
    dsn = _dsn(config)
    if dsn is None:
        db = sqlite3.connect(Path(data_dir) / "index.db", timeout=30)
        try:
            return [tuple(r) for r in db.execute(sql, args).fetchall()]
        finally:
            db.close()

    async def query() -> list[tuple[Any, ...]]:
        import asyncpg

        from mirror.index.postgres import translate
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(translate(sql), *args)]
        finally:
            await conn.close()
    return asyncio.run(query())


def _dsn(config: dict | IndexConfig | None) -> str | None:
    if isinstance(config, IndexConfig):
        return config.postgres.dsn if config.postgres else None
    section = (config or {}).get("index") or {}
    return (section.get("postgres") or {}).get("dsn")
