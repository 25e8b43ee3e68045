"""The PostgreSQL backend of the index (asyncpg; ``index: {postgres: {dsn}}``): a
connection pool per process, the schema's migrations applied at open (one process at
a time: mirror.cluster.schema's advisory lock), and the SQLite-dialect SQL of core.py
rewritten where PostgreSQL differs (``translate``).

Writers take turns, as SQLite's do: every write transaction starts by taking the
index's writer lock (pg_schema.WRITER_LOCK), which also keeps the change log in
commit order (pg_schema). asyncpg is imported here only; a config naming PostgreSQL
without it installed is one line at start-up.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from ..cluster import schema
from ..config_scale import PostgresConfig
from .db import IndexUnavailable, Query, Row
from .pg_schema import COMPONENT, MIGRATIONS, WRITER_LOCK

T = TypeVar("T")
POOL_SIZE = 10            # connections per process at most
CONNECT_TIMEOUT = 10.0    # seconds to reach the server at start-up

_INDEXED_BY = re.compile(r"\s+INDEXED BY \w+")
_MAX2 = re.compile(r"\bmax\(([^(),]+),([^(),]+)\)")     # scalar max(a, b); max(a) is the aggregate
_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """SQLite's dialect, as core.py writes it, in PostgreSQL's: ``$n`` placeholders,
    no ``INDEXED BY`` hints, ``greatest`` for the scalar ``max``, a plain JOIN for
    SQLite's order-keeping ``CROSS JOIN ... ON``, and a text parameter collated as the
    columns are (byte order: a recursive query's terms must agree)."""
    sql = _INDEXED_BY.sub("", sql).replace("CROSS JOIN", "JOIN")
    sql = sql.replace("CAST(? AS TEXT)", 'CAST(? AS TEXT) COLLATE "C"')
    sql = _MAX2.sub(r"greatest(\1,\2)", sql)
    numbers = iter(range(1, 100_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", sql)


def _errors() -> tuple[type[BaseException], ...]:
    import asyncpg  # type: ignore[import-untyped]
    return (asyncpg.PostgresError, asyncpg.InterfaceError, OSError)


def _failed(exc: BaseException) -> IndexUnavailable:
    text = " ".join(str(exc).split()) or type(exc).__name__
    error = IndexUnavailable(text)
    error.__cause__ = exc
    return error


class _Connection:
    """``db.Query`` on one connection (inside a transaction of ``writing``), or on the
    pool (reads only)."""

    def __init__(self, conn: Any, errors: tuple[type[BaseException], ...]):
        self._conn = conn
        self._errors = errors

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            rows: list[Row] = await self._conn.fetch(translate(sql), *args)
            return rows
        except self._errors as exc:
            raise _failed(exc) from exc

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        try:
            status = await self._conn.execute(translate(sql), *args)
        except self._errors as exc:
            raise _failed(exc) from exc
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._conn.executemany(translate(sql), rows)
        except self._errors as exc:
            raise _failed(exc) from exc


class PostgresDatabase:
    """``db.Database`` on an asyncpg pool."""

    dialect = "postgres"

    def __init__(self, pool: Any, config: PostgresConfig, owner: bool = True) -> None:
        self._pool = pool
        self.config = config
        self._owner = owner            # closes the pool (readers share it)
        self._errors = _errors()
        self.migration = "up to date"  # what opening did to the schema

    @classmethod
    async def open(cls, config: PostgresConfig, size: int = POOL_SIZE) -> PostgresDatabase:
        try:
            import asyncpg
        except ImportError:
            raise IndexUnavailable("PostgreSQL needs asyncpg, which is not installed: "
                                   "pip install 'mirror[postgres]'") from None
        # ValueError: a DSN asyncpg cannot parse; RuntimeError: a newer schema than ours
        errors: tuple[type[BaseException], ...] = (*_errors(), ValueError)
        migrate_errors: tuple[type[BaseException], ...] = (*errors, RuntimeError)
        try:
            pool = await asyncpg.create_pool(config.dsn, min_size=1, max_size=size,
                                             timeout=CONNECT_TIMEOUT)
        except errors as exc:
            raise _failed(exc) from exc
        try:
            async with pool.acquire() as conn:
                migrated = await schema.apply(conn, COMPONENT, MIGRATIONS)
        except migrate_errors as exc:
            await pool.close()
            raise _failed(exc) from exc
        except BaseException:
            pool.terminate()
            raise
        database = cls(pool, config)
        version = len(MIGRATIONS)
        database.migration = (f"applied {migrated} migration{'s' * (migrated != 1)}, now at "
                              f"schema version {version}" if migrated
                              else f"up to date (schema version {version})")
        return database

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        """A read on any of the pool's connections (asyncpg's pool fetches as they do)."""
        return await _Connection(self._pool, self._errors).fetch(sql, args)

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        async with self.writing() as tx:
            return await tx.execute(sql, args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self.writing() as tx:
            await tx.executemany(sql, rows)

    async def batches(self, sql: str, size: int) -> AsyncIterator[list[Row]]:
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                cursor = await conn.cursor(translate(sql))
                while rows := await cursor.fetch(size):
                    yield rows
        except self._errors as exc:
            raise _failed(exc) from exc

    @asynccontextmanager
    async def writing(self, immediate: bool = False) -> AsyncIterator[Query]:
        """A transaction holding the index's writer lock from its start (so
        ``immediate`` needs nothing more)."""
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", WRITER_LOCK)
                yield _Connection(conn, self._errors)
        except self._errors as exc:
            raise _failed(exc) from exc

    async def last_change(self) -> int:
        rows = await self.fetch("SELECT seq FROM change_seq")
        return int(rows[0][0]) if rows else 0

    async def readers(self, n: int) -> list[PostgresDatabase]:
        """The pool is shared: PostgreSQL's readers never wait for its writers."""
        return [PostgresDatabase(self._pool, self.config, owner=False) for _ in range(n)]

    async def snapshot_read(self, read: Callable[[Any], T]) -> T:
        """``read`` on a worker thread; its statements run on one connection inside a
        REPEATABLE READ, read-only transaction, each fetch handed to the event loop."""
        loop = asyncio.get_running_loop()
        try:
            async with self._pool.acquire() as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                return await asyncio.to_thread(read, _SyncBridge(conn, loop))
        except self._errors as exc:
            raise _failed(exc) from exc

    async def tune_for_reports(self) -> None:
        pass

    async def maintain(self) -> None:
        pass                    # autovacuum's job

    async def close(self) -> None:
        if self._owner:
            await self._pool.close()


class _SyncBridge:
    """What cache_maps reads with on a worker thread: ``execute(sql)`` -> a cursor with
    ``fetchmany``/``fetchall``, as sqlite3's, each fetch run on the event loop."""

    def __init__(self, conn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._conn, self._loop = conn, loop

    def _wait(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def execute(self, sql: str) -> _SyncCursor:
        return _SyncCursor(self, translate(sql))


class _SyncCursor:
    def __init__(self, bridge: _SyncBridge, sql: str) -> None:
        self._bridge, self._sql = bridge, sql
        self._cursor: Any = None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._bridge._wait(self._bridge._conn.fetch(self._sql))]

    def fetchmany(self, size: int) -> list[tuple[Any, ...]]:
        if self._cursor is None:
            self._cursor = self._bridge._wait(self._start())
        return [tuple(r) for r in self._bridge._wait(self._cursor.fetch(size))]

    async def _start(self) -> Any:
        return await self._bridge._conn.cursor(self._sql)
