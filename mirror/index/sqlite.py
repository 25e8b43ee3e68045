"""The SQLite backend of the index (aiosqlite, WAL): one connection per process, so
one writer; ``writing`` holds an asyncio lock so no other coroutine's statements land
inside a transaction, and SQLite's busy timeout makes other processes' writers wait.
The schema is created, and older index.db files upgraded, when it opens.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from .. import fileio
from .db import IndexUnavailable, Query, Row

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS blobs (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_access REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS manifests (
    digest TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL,
    first_seen REAL NOT NULL, last_access REAL NOT NULL, hits INTEGER NOT NULL DEFAULT 0);
-- Covering, so the cache's maps load in digest order without a table lookup per row
-- (cache_maps.load: 0.6 s instead of 3.3 s for a million blobs).
CREATE INDEX IF NOT EXISTS blobs_digest_size ON blobs (digest, size);
CREATE INDEX IF NOT EXISTS manifests_digest_entry ON manifests (digest, media_type, size);
CREATE TABLE IF NOT EXISTS manifest_refs (
    manifest TEXT NOT NULL, child TEXT NOT NULL, kind TEXT NOT NULL,
    PRIMARY KEY (manifest, child));
CREATE INDEX IF NOT EXISTS manifest_refs_child ON manifest_refs (child);
CREATE TABLE IF NOT EXISTS tags (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL,
    fetched_at REAL NOT NULL, expires_at REAL NOT NULL,
    pulls INTEGER NOT NULL DEFAULT 0, last_pull REAL,
    PRIMARY KEY (upstream, repository, tag));
CREATE INDEX IF NOT EXISTS tags_digest ON tags (digest);
CREATE TABLE IF NOT EXISTS repo_links (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, digest TEXT NOT NULL,
    linked_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (upstream, repository, digest));
-- What links a digest: `mirror stats`' repositories, hosted gc's "no link left" checks.
CREATE INDEX IF NOT EXISTS repo_links_digest ON repo_links (digest);
CREATE TABLE IF NOT EXISTS pins (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, reference TEXT NOT NULL,
    pinned_at REAL NOT NULL, PRIMARY KEY (upstream, repository, reference));
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- The same counters by the hour they were counted in (start of the hour, epoch seconds),
-- for the web page's overview; the leader prunes hours older than HOURLY_KEPT.
CREATE TABLE IF NOT EXISTS hourly (
    hour INTEGER NOT NULL, name TEXT NOT NULL, value INTEGER NOT NULL,
    PRIMARY KEY (hour, name));
CREATE TABLE IF NOT EXISTS tag_lists (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, tags TEXT NOT NULL,
    fetched_at REAL NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (upstream, repository));
CREATE TABLE IF NOT EXISTS referrer_lists (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, subject TEXT NOT NULL,
    manifests TEXT NOT NULL, fetched_at REAL NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (upstream, repository, subject));
CREATE TABLE IF NOT EXISTS referrers (
    upstream TEXT NOT NULL, repository TEXT NOT NULL, subject TEXT NOT NULL,
    digest TEXT NOT NULL, media_type TEXT NOT NULL, artifact_type TEXT, size INTEGER NOT NULL,
    annotations TEXT, PRIMARY KEY (upstream, repository, subject, digest));
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL DEFAULT ((julianday('now') - 2440587.5) * 86400.0),
    kind TEXT NOT NULL, a TEXT, b TEXT, c TEXT, d TEXT, n INTEGER, x REAL, y REAL);
CREATE TRIGGER IF NOT EXISTS blob_added AFTER INSERT ON blobs BEGIN
    INSERT INTO changes (kind, a, n) VALUES ('blob', NEW.digest, NEW.size); END;
CREATE TRIGGER IF NOT EXISTS blob_resized AFTER UPDATE OF size ON blobs BEGIN
    INSERT INTO changes (kind, a, n) VALUES ('blob', NEW.digest, NEW.size); END;
CREATE TRIGGER IF NOT EXISTS blob_gone AFTER DELETE ON blobs BEGIN
    INSERT INTO changes (kind, a) VALUES ('blob-', OLD.digest); END;
CREATE TRIGGER IF NOT EXISTS manifest_added AFTER INSERT ON manifests BEGIN
    INSERT INTO changes (kind, a, b, n) VALUES ('manifest', NEW.digest, NEW.media_type,
                                                NEW.size); END;
CREATE TRIGGER IF NOT EXISTS manifest_gone AFTER DELETE ON manifests BEGIN
    INSERT INTO changes (kind, a) VALUES ('manifest-', OLD.digest); END;
CREATE TRIGGER IF NOT EXISTS tag_added AFTER INSERT ON tags BEGIN
    INSERT INTO changes (kind, a, b, c, d, x, y) VALUES ('tag', NEW.upstream, NEW.repository,
        NEW.tag, NEW.digest, NEW.fetched_at, NEW.expires_at); END;
CREATE TRIGGER IF NOT EXISTS tag_moved AFTER UPDATE OF digest, fetched_at, expires_at ON tags
BEGIN
    INSERT INTO changes (kind, a, b, c, d, x, y) VALUES ('tag', NEW.upstream, NEW.repository,
        NEW.tag, NEW.digest, NEW.fetched_at, NEW.expires_at); END;
CREATE TRIGGER IF NOT EXISTS tag_gone AFTER DELETE ON tags BEGIN
    INSERT INTO changes (kind, a, b, c) VALUES ('tag-', OLD.upstream, OLD.repository,
                                                OLD.tag); END;
CREATE TRIGGER IF NOT EXISTS link_added AFTER INSERT ON repo_links BEGIN
    INSERT INTO changes (kind, a, b, c) VALUES ('link', NEW.upstream, NEW.repository,
                                                NEW.digest); END;
CREATE TRIGGER IF NOT EXISTS link_gone AFTER DELETE ON repo_links BEGIN
    INSERT INTO changes (kind, a, b, c) VALUES ('link-', OLD.upstream, OLD.repository,
                                                OLD.digest); END;
"""


REFERRERS_PENDING = "referrers_backfill"     # meta key: hosted referrers not recorded yet
SCHEMA_VERSION = "1"


async def _abandon(db: aiosqlite.Connection, timeout: float = 5.0) -> None:
    """Close a connection that failed while opening. aiosqlite runs each connection on
    a non-daemon thread that only a close ends: one left open keeps the process from
    exiting (a read-only index.db hung `mirror serve` and `mirror stats` for ever)."""
    try:
        await asyncio.wait_for(db.close(), timeout)
    except BaseException:
        db.stop()          # the thread ends once it has run what was queued before


def _failed(exc: sqlite3.Error) -> IndexUnavailable:
    error = IndexUnavailable(str(exc))
    error.__cause__ = exc
    return error


async def _prepare(db: aiosqlite.Connection) -> list[str]:
    """Create the schema, or bring an older index.db up to it; what was done."""
    done: list[str] = []
    tables = {r[0] for r in await db.execute_fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    await db.executescript(SCHEMA)
    if "blobs" not in tables:
        done.append("created the schema")
    if "referrers" not in tables:      # new, or from before referrers: hosted manifests
        await db.execute(               # pushed until now are recorded at the next start
            f"INSERT OR IGNORE INTO meta VALUES ('{REFERRERS_PENDING}', '1')")
        if "blobs" in tables:
            done.append("added the referrers tables")
    await db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                     (SCHEMA_VERSION,))
    columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(tags)")}
    if "pulls" not in columns:     # index.db from before tag pull counts
        await db.execute("ALTER TABLE tags ADD COLUMN pulls INTEGER NOT NULL DEFAULT 0")
        await db.execute("ALTER TABLE tags ADD COLUMN last_pull REAL")
        done.append("added tags.pulls and tags.last_pull")
    columns = {row[1] for row in
               await db.execute_fetchall("PRAGMA table_info(repo_links)")}
    if "linked_at" not in columns:   # index.db from before hosted gc: the grace
        await db.execute(             # of hosted gc counts from the upgrade
            "ALTER TABLE repo_links ADD COLUMN linked_at REAL NOT NULL DEFAULT 0")
        await db.execute("UPDATE repo_links SET linked_at = ?", (time.time(),))
        done.append("added repo_links.linked_at")
    await db.commit()
    return done


class SqliteDatabase:
    """``db.Database`` on one aiosqlite connection."""

    dialect = "sqlite"

    def __init__(self, db: aiosqlite.Connection, path: Path | None = None) -> None:
        self._db = db
        self.path = path
        self._lock = asyncio.Lock()
        self.migration = "up to date"        # what opening did to the schema

    @classmethod
    async def open(cls, path: Path) -> SqliteDatabase:
        try:
            db = await aiosqlite.connect(str(path))
        except sqlite3.Error as exc:
            raise _failed(exc) from exc
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            done = await _prepare(db)
        except sqlite3.Error as exc:
            await _abandon(db)
            raise _failed(exc) from exc
        except BaseException:
            await _abandon(db)
            raise
        database = cls(db, path)
        database.migration = (", ".join(done) or "up to date") + \
            f" (schema version {SCHEMA_VERSION})"
        return database

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[Row]:
        try:
            return cast(list[Row], await self._db.execute_fetchall(sql, args))
        except sqlite3.Error as exc:
            raise _failed(exc) from exc

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        try:
            cur = await self._db.execute(sql, args)
            count = cur.rowcount
            await cur.close()
            return count
        except sqlite3.Error as exc:
            raise _failed(exc) from exc

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            await self._db.executemany(sql, rows)
        except sqlite3.Error as exc:
            raise _failed(exc) from exc

    async def batches(self, sql: str, size: int) -> AsyncIterator[list[Row]]:
        try:
            async with self._db.execute(sql) as cur:
                while rows := await cur.fetchmany(size):
                    yield cast(list[Row], rows)
        except sqlite3.Error as exc:
            raise _failed(exc) from exc

    @asynccontextmanager
    async def writing(self, immediate: bool = False) -> AsyncIterator[Query]:
        async with self._lock:
            try:
                if immediate:
                    await self._db.execute("BEGIN IMMEDIATE")
                yield self
                await self._db.commit()
            except sqlite3.Error as exc:
                await self._db.rollback()
                raise _failed(exc) from exc
            except BaseException:
                await self._db.rollback()
                raise

    async def last_change(self) -> int:
        rows = await self.fetch("SELECT seq FROM sqlite_sequence WHERE name = 'changes'")
        return int(rows[0][0]) if rows else 0

    async def readers(self, n: int) -> list[SqliteDatabase]:
        """Read-only connections of their own to the same file (WAL: reads never wait
        for this connection's writes, nor it for theirs)."""
        found: list[SqliteDatabase] = []
        try:
            for _ in range(n):
                db = await aiosqlite.connect(f"file:{self.path}?mode=ro", uri=True)
                found.append(SqliteDatabase(db, self.path))
                await db.execute("PRAGMA busy_timeout=5000")
                await db.execute("PRAGMA query_only=1")
        except BaseException as exc:
            for reader in found:
                await reader.close()
            if isinstance(exc, sqlite3.Error):
                raise _failed(exc) from exc
            raise
        return found

    async def snapshot_read(self, read: Callable[[Any], T]) -> T:
        return await fileio.run(self._snapshot_read, read)

    def _snapshot_read(self, read: Callable[[Any], T]) -> T:
        try:
            db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("BEGIN")
                found = read(db)
                db.execute("COMMIT")
                return found
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise _failed(exc) from exc

    async def tune_for_reports(self) -> None:
        """The CLI's big reads: temporary B-trees (the recursive closures of `mirror
        stats`, `ls`, `gc`) in memory instead of a temp file, and a 128 MB page cache
        instead of 2 MB. Not for the server, whose memory stays small."""
        await self.execute("PRAGMA temp_store=MEMORY")
        await self.execute("PRAGMA cache_size=-131072")

    async def maintain(self) -> None:
        await self.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def close(self) -> None:
        await self._db.close()
