"""The index: what is cached, tags and their freshness, links, pins, usage, counters.
One body of logic (core.Index) over a small database interface (db.py), with two
backends: SQLite in the data directory (sqlite.py, the default) and PostgreSQL
(postgres.py, ``index: {postgres: {dsn}}``; asyncpg, imported only then). Imports
only the standard library, the drivers, mirror.models, mirror.fileio, mirror.config_scale
and mirror.cluster.schema.
"""

from __future__ import annotations

from pathlib import Path

from ..config_scale import IndexConfig
from .core import (
    GENERATIONS,
    HOUR,
    HOURLY_KEPT,
    LOAD_BATCH,
    SIZE_OF,
    VARIABLES,
    Change,
    HostedSweep,
    Index,
    TagRow,
)
from .db import Database, IndexUnavailable
from .sqlite import REFERRERS_PENDING, SCHEMA, SqliteDatabase

SQLITE = IndexConfig()          # the default: index.db in the data directory

__all__ = ["GENERATIONS", "HOUR", "HOURLY_KEPT", "LOAD_BATCH", "REFERRERS_PENDING", "SCHEMA",
           "SIZE_OF", "SQLITE", "VARIABLES", "Change", "Database", "HostedSweep", "Index",
           "IndexUnavailable", "TagRow", "open_database", "open_index", "where"]


def where(data_dir: Path, config: IndexConfig) -> str:
    """Where the index lives, for messages: index.db's path, or the masked DSN."""
    if config.postgres is not None:
        return f"index.postgres.dsn ({config.postgres.safe_dsn})"
    return str(Path(data_dir) / "index.db")


async def open_database(data_dir: Path, config: IndexConfig = SQLITE) -> Database:
    """The index's database, its schema created or brought up to date (SQLite:
    ``data_dir/index.db``; PostgreSQL: the migrations, one process at a time).
    IndexUnavailable when it cannot be used."""
    if config.postgres is None:
        return await SqliteDatabase.open(Path(data_dir) / "index.db")
    from .postgres import PostgresDatabase
    return await PostgresDatabase.open(config.postgres)


async def open_index(data_dir: Path, config: IndexConfig = SQLITE, *,
                     flush: bool = True, checkpoint: bool = True,
                     flush_interval: float = 1.0) -> Index:
    """The index a cache in ``data_dir`` uses (``Index.start``'s flushing options)."""
    return Index.start(await open_database(data_dir, config), flush_interval, flush,
                       checkpoint)
