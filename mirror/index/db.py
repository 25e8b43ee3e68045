"""The small database interface the index's logic (core.py) is written against, and the
one exception family for "the index cannot be used", whichever database is behind it.

SQL is written once, in SQLite's dialect with ``?`` placeholders (the default backend
runs it as written); the PostgreSQL backend rewrites the few dialect bits it needs
(postgres.py). A backend offers reads (``fetch``, ``batches``), writes in a
transaction (``writing``: one writer at a time, as SQLite has) and a few named
statements where the two differ (``last_change``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Row = Sequence[Any]


class IndexUnavailable(Exception):
    """The index's database failed or cannot be reached (sqlite3.Error, asyncpg's
    errors, a refused connection): what callers catch instead of a driver's errors.
    ``__cause__`` is the driver's exception."""


class Query(Protocol):
    """What reads and writes run on: the database (reads, each on its own) or a
    transaction (``Database.writing``: everything on one connection)."""

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]: ...

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


class Database(Query, Protocol):
    dialect: str                      # "sqlite" or "postgres"
    migration: str                    # what opening did to the schema, for `mirror migrate`

    def batches(self, sql: str, size: int) -> AsyncIterator[list[Row]]:
        """The rows of ``sql``, ``size`` at a time."""
        ...

    def writing(self, immediate: bool = False) -> AbstractAsyncContextManager[Query]:
        """A write transaction, committed at the end of the block (rolled back on an
        exception); writers take turns. ``immediate``: it takes the database's write
        lock before its first read (SQLite's BEGIN IMMEDIATE), so what it reads is not
        changed by another process before it commits."""
        ...

    async def last_change(self) -> int:
        """The number of the last change logged (see core.Index.last_change)."""
        ...

    async def readers(self, n: int) -> Sequence[Database]:
        """``n`` databases for big reads that must not queue behind this one's writes
        (the web page's): read-only connections of their own, or this one's pool."""
        ...

    async def snapshot_read(self, read: Any) -> Any:
        """``read(conn)`` on a worker thread, inside one read-only transaction (a
        consistent snapshot); ``conn.execute(sql)`` gives a cursor with ``fetchmany``
        and ``fetchall``, as sqlite3's does. For the cache's maps (cache_maps.read)."""
        ...

    async def tune_for_reports(self) -> None: ...

    async def maintain(self) -> None:
        """Periodic upkeep, after a usage flush (SQLite: a WAL checkpoint)."""
        ...

    async def close(self) -> None: ...
