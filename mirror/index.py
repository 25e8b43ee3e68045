"""The SQLite index (aiosqlite, WAL): blobs, manifests, tags, repository links, pins,
usage and counters (totals, and by the hour for the web page's overview).

One connection, so one writer. Multi-statement writes hold ``_write_lock`` so
no other coroutine's statements land inside them. Usage (last access, hits, tag
pulls) and counters are kept in memory and flushed about once a second in one
transaction, so no request waits for a SQLite write on a cache hit. The CLI reads
and maintains the same file with its own connection (WAL lets both work at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from .models import HOSTED, References, Referrer

log = logging.getLogger("mirror.index")

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
SCHEMA_VERSION = "1"
REFERRERS_PENDING = "referrers_backfill"     # meta key: hosted referrers not recorded yet
GENERATIONS = {"content": "generation", "pins": "pins_generation"}   # kind -> meta key
# The size of digest {d} (a blob's, else a manifest's, else 0): one look in a covering
# index for a blob (coalesce stops at the first value), where two LEFT JOINs looked in both
# tables and then in the blob's row: 6.8 -> 4.1 s of CPU for `mirror stats` at a million.
SIZE_OF = ("coalesce((SELECT size FROM blobs INDEXED BY blobs_digest_size WHERE digest = {d}), "
           "(SELECT size FROM manifests INDEXED BY manifests_digest_entry WHERE digest = {d}), 0)")
LOAD_BATCH = 10_000  # rows read at a time when loading the maps
VARIABLES = 500     # bound values per statement: far below SQLite's limit on any build
HOUR = 3600
HOURLY_KEPT = 8 * 24 * HOUR   # seconds of hourly counters kept (the leader prunes the rest)


async def _abandon(db: aiosqlite.Connection, timeout: float = 5.0) -> None:
    """Close a connection that failed while opening. aiosqlite runs each connection on
    a non-daemon thread that only a close ends: one left open keeps the process from
    exiting (a read-only index.db hung `mirror serve` and `mirror stats` for ever)."""
    try:
        await asyncio.wait_for(db.close(), timeout)
    except BaseException:
        db.stop()          # the thread ends once it has run what was queued before


def _shared() -> Callable[[str], str]:
    """One string object for each distinct value passed: SQLite hands out a new string
    per row, and a million links name a few thousand upstreams and repositories."""
    seen: dict[str, str] = {}
    return lambda text: seen.setdefault(text, text)


@dataclass(frozen=True)
class TagRow:
    upstream: str
    repository: str
    tag: str
    digest: str
    fetched_at: float
    expires_at: float


@dataclass(frozen=True)
class Change:
    """One row of the change log (see ``Index.changes_since``): ``kind`` is blob,
    manifest, tag or link (added or changed) or the same with ``-`` (removed); the
    other fields are the row's columns, in the order of the trigger that wrote it."""

    seq: int
    kind: str
    a: str | None
    b: str | None
    c: str | None
    d: str | None
    n: int | None
    x: float | None
    y: float | None


class Index:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._write_lock = asyncio.Lock()
        self._usage: dict[tuple[str, str], list[float]] = {}   # (table, digest) -> [last, hits]
        self._pulls: dict[tuple[str, str, str], list[float]] = {}   # tag -> [last, pulls]
        self._counters: dict[str, int] = {}
        self._hourly: dict[tuple[int, str], int] = {}   # (hour, name) -> n counted in it
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, flush_interval: float = 1.0, flush: bool = True,
                   checkpoint: bool = True) -> Index:
        db = await aiosqlite.connect(str(path))
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA busy_timeout=5000")
            had_referrers = bool(await db.execute_fetchall(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'referrers'"))
            await db.executescript(SCHEMA)
            if not had_referrers:     # new, or from before referrers: hosted manifests
                await db.execute(      # pushed until now are recorded at the next start
                    f"INSERT OR IGNORE INTO meta VALUES ('{REFERRERS_PENDING}', '1')")
            await db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                             (SCHEMA_VERSION,))
            columns = {row[1] for row in await db.execute_fetchall("PRAGMA table_info(tags)")}
            if "pulls" not in columns:     # index.db from before tag pull counts
                await db.execute("ALTER TABLE tags ADD COLUMN pulls INTEGER NOT NULL DEFAULT 0")
                await db.execute("ALTER TABLE tags ADD COLUMN last_pull REAL")
            columns = {row[1] for row in
                       await db.execute_fetchall("PRAGMA table_info(repo_links)")}
            if "linked_at" not in columns:   # index.db from before hosted gc: the grace
                await db.execute(             # of hosted gc counts from the upgrade
                    "ALTER TABLE repo_links ADD COLUMN linked_at REAL NOT NULL DEFAULT 0")
                await db.execute("UPDATE repo_links SET linked_at = ?", (time.time(),))
            await db.commit()
        except BaseException:
            await _abandon(db)
            raise
        index = cls(db)
        if flush:
            index._flusher = asyncio.create_task(index._flush_loop(flush_interval, checkpoint))
        return index

    async def for_reports(self) -> None:
        """Tune this connection for the CLI's big reads: temporary B-trees (the
        recursive closures of `mirror stats`, `ls`, `gc`) in memory instead of a temp
        file, and a 128 MB page cache instead of 2 MB. Not for the server, whose
        memory stays small."""
        await self._db.execute("PRAGMA temp_store=MEMORY")
        await self._db.execute("PRAGMA cache_size=-131072")

    async def ping(self) -> None:
        await self._db.execute_fetchall("SELECT 1")

    async def close(self) -> None:
        if self._flusher:
            self._flusher.cancel()
            try:
                await self._flusher
            except asyncio.CancelledError:
                pass
        try:
            await self.flush_usage()
        except Exception:     # usage counts are best effort; the data is safe without them
            log.exception("final usage flush failed")
        await self._db.close()

    # -- loading at start-up ----------------------------------------------------------------

    async def load_blobs(self) -> dict[str, int]:
        rows = await self._db.execute_fetchall("SELECT digest, size FROM blobs")
        return {d: s for d, s in rows}

    async def load_manifests(self) -> dict[str, tuple[str, int]]:
        rows = await self._db.execute_fetchall("SELECT digest, media_type, size FROM manifests")
        return {d: (mt, s) for d, mt, s in rows}

    async def load_tags(self) -> list[TagRow]:
        rows = await self._db.execute_fetchall(
            "SELECT upstream, repository, tag, digest, fetched_at, expires_at FROM tags")
        name = _shared()
        return [TagRow(name(u), name(r), *rest) for u, r, *rest in rows]

    async def load_links(self) -> set[tuple[str, str, str]]:
        """Read in batches, so the memory of each batch's row strings (most of them
        dropped for shared ones) is reused by the next instead of all being held at once."""
        name = _shared()
        links: set[tuple[str, str, str]] = set()
        async with self._db.execute("SELECT upstream, repository, digest FROM repo_links") as cur:
            while rows := await cur.fetchmany(LOAD_BATCH):
                links.update((name(u), name(r), d) for u, r, d in rows)
        return links

    # -- the change log: what every write did, for the other worker processes ----------------
    # Triggers (SCHEMA) append a row to `changes` for each blob, manifest, tag and link
    # added, changed or removed, by any process; each worker reads on from where it was
    # (``changes_since``) and applies them to its maps. The leader prunes old rows.

    async def last_change(self) -> int:
        """The number of the last change made (pruned or not)."""
        rows = list(await self._db.execute_fetchall(
            "SELECT seq FROM sqlite_sequence WHERE name = 'changes'"))
        return int(rows[0][0]) if rows else 0

    async def changes_since(self, seq: int, limit: int = LOAD_BATCH) -> list[Change] | None:
        """The changes after ``seq``, oldest first, at most ``limit``; None when some of
        them were pruned already (the caller reloads everything)."""
        rows = await self._db.execute_fetchall(
            "SELECT seq, kind, a, b, c, d, n, x, y FROM changes WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (seq, limit))
        changes = [Change(*row) for row in rows]
        # Numbers are consecutive (one writer at a time, AUTOINCREMENT): a hole after
        # ``seq`` means the rows were pruned before the caller read them.
        if changes:
            return None if changes[0].seq != seq + 1 else changes
        return None if await self.last_change() > seq else []

    async def prune_changes(self, before: float) -> None:
        await self._write(("DELETE FROM changes WHERE at < ?", [(before,)]))

    async def prune_hourly(self, before: float) -> None:
        """Drop the hourly counters of hours that ended before ``before``."""
        await self._write(("DELETE FROM hourly WHERE hour + ? <= ?", [(HOUR, before)]))

    # -- single rows, for what another worker process may have added --------------------------

    async def blob_size(self, digest: str) -> int | None:
        rows = list(await self._db.execute_fetchall("SELECT size FROM blobs WHERE digest = ?",
                                                    (digest,)))
        return int(rows[0][0]) if rows else None

    async def is_linked(self, upstream: str, repository: str, digest: str) -> bool:
        return bool(await self._db.execute_fetchall(
            "SELECT 1 FROM repo_links WHERE upstream = ? AND repository = ? AND digest = ?",
            (upstream, repository, digest)))

    # -- writes (cache misses: not on the hot path) -----------------------------------------

    async def _write(self, *statements: tuple[str, list[tuple[Any, ...]]]) -> None:
        """Run statements (each with its rows, via executemany) as one transaction."""
        async with self._write_lock:
            try:
                for sql, rows in statements:
                    if rows:
                        await self._db.executemany(sql, rows)
                await self._db.commit()
            except BaseException:
                await self._db.rollback()
                raise

    async def add_blob(self, digest: str, size: int) -> None:
        now = time.time()
        await self._write((
            "INSERT INTO blobs (digest, size, first_seen, last_access) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (digest) DO UPDATE SET size = excluded.size", [(digest, size, now, now)]))

    async def add_manifest(self, digest: str, media_type: str, size: int, refs: References) -> None:
        now = time.time()
        children = [(digest, c, "blob") for c in refs.blobs] + \
                   [(digest, c, "manifest") for c in refs.manifests]
        await self._write(
            ("INSERT INTO manifests (digest, media_type, size, first_seen, last_access) "
             "VALUES (?, ?, ?, ?, ?) ON CONFLICT (digest) DO NOTHING",
             [(digest, media_type, size, now, now)]),
            ("INSERT OR IGNORE INTO manifest_refs (manifest, child, kind) VALUES (?, ?, ?)",
             children))

    async def set_tag(self, row: TagRow) -> None:
        await self._write((
            "INSERT INTO tags (upstream, repository, tag, digest, fetched_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (upstream, repository, tag) "
            "DO UPDATE SET digest = excluded.digest, fetched_at = excluded.fetched_at, "
            "expires_at = excluded.expires_at",
            [(row.upstream, row.repository, row.tag, row.digest, row.fetched_at, row.expires_at)]))

    async def link(self, upstream: str, repository: str, digests: Iterable[str]) -> None:
        now = time.time()
        await self._write(("INSERT OR IGNORE INTO repo_links "
                           "(upstream, repository, digest, linked_at) VALUES (?, ?, ?, ?)",
                           [(upstream, repository, d, now) for d in digests]))

    async def set_tag_list(self, upstream: str, repository: str, tags: list[str],
                           fetched_at: float, expires_at: float) -> None:
        await self._write((
            "INSERT INTO tag_lists VALUES (?, ?, ?, ?, ?) ON CONFLICT (upstream, repository) "
            "DO UPDATE SET tags = excluded.tags, fetched_at = excluded.fetched_at, "
            "expires_at = excluded.expires_at",
            [(upstream, repository, json.dumps(tags), fetched_at, expires_at)]))

    async def forget(self, blobs: list[str], manifests: list[str]) -> None:
        """Drop rows whose files are gone, and tags pointing at those manifests."""
        gone_b, gone_m = [(d,) for d in blobs], [(d,) for d in manifests]
        await self._write(("DELETE FROM blobs WHERE digest = ?", gone_b),
                          ("DELETE FROM manifests WHERE digest = ?", gone_m),
                          ("DELETE FROM manifest_refs WHERE manifest = ?", gone_m),
                          ("DELETE FROM tags WHERE digest = ?", gone_m))

    # -- reads for the rarer endpoints -------------------------------------------------------

    async def tag_list(self, upstream: str, repository: str) -> tuple[list[str], float] | None:
        rows = await self._db.execute_fetchall(
            "SELECT tags, expires_at FROM tag_lists WHERE upstream = ? AND repository = ?",
            (upstream, repository))
        row = next(iter(rows), None)
        if row is None:
            return None
        return json.loads(row[0]), row[1]

    async def repositories(self) -> list[tuple[str, str]]:
        rows = await self._db.execute_fetchall(
            # From the manifests (a tenth of the rows) to their links, not every link
            # to the manifests: CROSS JOIN keeps that order (2.2 s -> 0.4 s at a million).
            "SELECT DISTINCT l.upstream, l.repository FROM manifests m "
            "CROSS JOIN repo_links l ON l.digest = m.digest ORDER BY 1, 2")
        return [tuple(r) for r in rows]

    async def add_referrer(self, upstream: str, repository: str, subject: str,
                           referrer: Referrer) -> None:
        """Record that ``referrer`` (a manifest of the repository) names ``subject``."""
        await self._write((
            "INSERT OR REPLACE INTO referrers (upstream, repository, subject, digest, "
            "media_type, artifact_type, size, annotations) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(upstream, repository, subject, referrer.digest, referrer.media_type,
              referrer.artifact_type, referrer.size,
              json.dumps(referrer.annotations) if referrer.annotations else None)]))

    async def referrers_pending(self) -> bool:
        rows = await self._db.execute_fetchall("SELECT 1 FROM meta WHERE key = ?",
                                               (REFERRERS_PENDING,))
        return bool(rows)

    async def referrers_recorded(self) -> None:
        await self._write(("DELETE FROM meta WHERE key = ?", [(REFERRERS_PENDING,)]))

    async def referrers_of(self, upstream: str, repository: str,
                           subject: str) -> list[Referrer]:
        """The manifests of the repository whose subject is ``subject``: only those
        still linked there (a deleted or collected manifest is no longer a referrer)."""
        rows = await self._db.execute_fetchall(
            "SELECT r.digest, r.media_type, r.artifact_type, r.size, r.annotations "
            "FROM referrers r JOIN repo_links l ON l.upstream = r.upstream "
            "AND l.repository = r.repository AND l.digest = r.digest "
            "WHERE r.upstream = ? AND r.repository = ? AND r.subject = ? ORDER BY r.digest",
            (upstream, repository, subject))
        return [Referrer(d, m, a, s, json.loads(n) if n else {}) for d, m, a, s, n in rows]

    async def set_referrer_list(self, upstream: str, repository: str, subject: str,
                                index: dict[str, Any], expires_at: float) -> None:
        """Cache an upstream's referrers of ``subject`` (an image index) until ``expires_at``."""
        await self._write((
            "INSERT OR REPLACE INTO referrer_lists VALUES (?, ?, ?, ?, ?, ?)",
            [(upstream, repository, subject, json.dumps(index), time.time(), expires_at)]))

    async def referrer_list(self, upstream: str, repository: str,
                            subject: str) -> tuple[dict[str, Any], float] | None:
        rows = await self._db.execute_fetchall(
            "SELECT manifests, expires_at FROM referrer_lists "
            "WHERE upstream = ? AND repository = ? AND subject = ?",
            (upstream, repository, subject))
        row = next(iter(rows), None)
        return None if row is None else (json.loads(row[0]), row[1])

    # -- eviction ------------------------------------------------------------------------------

    async def protected(self, now: float) -> set[str]:
        """Digests that must stay: everything reachable from a tag inside its TTL or
        from a pin (a pinned tag, whatever its TTL, or a pinned digest), and everything
        linked to a hosted repository (pushed content is never evicted)."""
        rows = await self._db.execute_fetchall(
            """WITH RECURSIVE roots(d) AS (
                   SELECT digest FROM tags WHERE expires_at > :now
                   UNION SELECT digest FROM repo_links WHERE upstream = :hosted
                   UNION SELECT t.digest FROM pins p JOIN tags t ON t.upstream = p.upstream
                         AND t.repository = p.repository AND t.tag = p.reference
                   UNION SELECT reference FROM pins WHERE reference LIKE '%:%'),
               live(d) AS (
                   SELECT d FROM roots
                   UNION SELECT r.child FROM manifest_refs r JOIN live ON r.manifest = live.d)
               SELECT d FROM live""", {"now": now, "hosted": HOSTED})
        return {r[0] for r in rows}

    async def by_last_access(self) -> list[tuple[str, int, float, bool]]:
        """(digest, size, last access, is a manifest) of everything, least recent first."""
        rows = await self._db.execute_fetchall(
            "SELECT digest, size, last_access, 0 FROM blobs UNION ALL "
            "SELECT digest, size, last_access, 1 FROM manifests ORDER BY 3")
        return [(d, s, t, bool(m)) for d, s, t, m in rows]

    async def parents(self, digests: Iterable[str]) -> set[str]:
        """Manifests that reference any of ``digests``, and the manifests above them.
        Asked ``VARIABLES`` digests at a time: a plan may hold any number of them."""
        found: set[str] = set()
        frontier = set(digests)
        while frontier:
            batch, above = list(frontier), set[str]()
            for i in range(0, len(batch), VARIABLES):
                part = batch[i:i + VARIABLES]
                rows = await self._db.execute_fetchall(
                    "SELECT DISTINCT manifest FROM manifest_refs "
                    f"WHERE child IN ({','.join('?' * len(part))})", part)
                above.update(r[0] for r in rows)
            frontier = above - found
            found |= frontier
        return found

    async def orphan_blobs(self, seen_before: float) -> list[tuple[str, int]]:
        """Blobs no cached manifest references (first seen before ``seen_before``)."""
        rows = await self._db.execute_fetchall(      # NOT EXISTS: one look in manifest_refs_child
            "SELECT digest, size FROM blobs b WHERE first_seen < ? AND NOT EXISTS "   # per blob
            "(SELECT 1 FROM manifest_refs r JOIN manifests m ON m.digest = r.manifest "
            "WHERE r.child = b.digest)", (seen_before,))
        return [tuple(r) for r in rows]

    async def generations(self) -> dict[str, int]:
        """Counters bumped by out-of-process changes, by kind (``GENERATIONS``):
        "content" (`mirror gc`, `verify`: blobs, manifests, tags or links went) tells the
        server to reload its in-memory view; "pins" (`mirror pin`, `unpin`) changes
        nothing it holds in memory."""
        rows = await self._db.execute_fetchall(
            f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(GENERATIONS))})",
            list(GENERATIONS.values()))
        values = {key: int(value) for key, value in rows}
        return {kind: values.get(key, 0) for kind, key in GENERATIONS.items()}

    async def bump_generation(self, kind: str = "content") -> None:
        await self._write(("INSERT INTO meta VALUES (?, '1') ON CONFLICT (key) "
                           "DO UPDATE SET value = CAST(value AS INTEGER) + 1",
                           [(GENERATIONS[kind],)]))

    # -- pins ------------------------------------------------------------------------------------

    async def pin(self, upstream: str, repository: str, reference: str) -> None:
        await self._write(("INSERT OR IGNORE INTO pins VALUES (?, ?, ?, ?)",
                           [(upstream, repository, reference, time.time())]))

    async def unpin(self, upstream: str, repository: str, reference: str) -> bool:
        async with self._write_lock:
            cur = await self._db.execute(
                "DELETE FROM pins WHERE upstream = ? AND repository = ? AND reference = ?",
                (upstream, repository, reference))
            await self._db.commit()
            return cur.rowcount > 0

    # -- usage, batched ------------------------------------------------------------------------

    def touch(self, digest: str, manifest: bool = False) -> None:
        key = ("manifests" if manifest else "blobs", digest)
        entry = self._usage.get(key)
        if entry is None:
            self._usage[key] = [time.time(), 1]
        else:
            entry[0] = time.time()
            entry[1] += 1

    def count_pull(self, upstream: str, repository: str, tag: str) -> None:
        entry = self._pulls.setdefault((upstream, repository, tag), [0.0, 0])
        entry[0] = time.time()
        entry[1] += 1

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``: to its total and to the hour it is counted in
        (not the hour of the flush that writes it)."""
        self._counters[name] = self._counters.get(name, 0) + n
        key = (int(time.time()) // HOUR * HOUR, name)
        self._hourly[key] = self._hourly.get(key, 0) + n

    async def flush_usage(self) -> None:
        if not (self._usage or self._pulls or self._counters or self._hourly):
            return
        usage, self._usage = self._usage, {}
        pulls, self._pulls = self._pulls, {}
        counters, self._counters = self._counters, {}
        hourly, self._hourly = self._hourly, {}
        by_table: dict[str, list[tuple[float, float, str]]] = {"blobs": [], "manifests": []}
        for (table, digest), (last, hits) in usage.items():
            by_table[table].append((last, hits, digest))
        write = asyncio.ensure_future(self._write(
            *((f"UPDATE {table} SET last_access = max(last_access, ?), hits = hits + ? "
               "WHERE digest = ?", rows) for table, rows in by_table.items()),
            ("UPDATE tags SET last_pull = ?, pulls = pulls + ? "
             "WHERE upstream = ? AND repository = ? AND tag = ?",
             [(last, n, *key) for key, (last, n) in pulls.items()]),
            ("INSERT INTO counters VALUES (?, ?) "
             "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
             list(counters.items())),
            ("INSERT INTO hourly VALUES (?, ?, ?) "
             "ON CONFLICT (hour, name) DO UPDATE SET value = value + excluded.value",
             [(hour, name, n) for (hour, name), n in hourly.items()])))
        # The write runs to its end even if this flush is cancelled (the server stopping
        # cancels the periodic flush, then flushes once more): cancelled half-way it
        # would roll back, and the counts it held would be lost (with several workers
        # writing, a flush often waits for the database's lock). If it failed, its
        # counts go back to be written by the next flush.
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            try:
                await write
            except Exception:
                self._take_back(usage, pulls, counters, hourly)
            raise
        except Exception:
            self._take_back(usage, pulls, counters, hourly)
            raise

    def _take_back(self, usage: dict[tuple[str, str], list[float]],
                   pulls: dict[tuple[str, str, str], list[float]],
                   counters: dict[str, int], hourly: dict[tuple[int, str], int]) -> None:
        """Counts a failed flush held, added back to those gathered since."""
        def merge(mine: dict[Any, list[float]], theirs: dict[Any, list[float]]) -> None:
            for key, (last, n) in theirs.items():
                entry = mine.setdefault(key, [0.0, 0])
                entry[0] = max(entry[0], last)
                entry[1] += n
        merge(self._usage, usage)
        merge(self._pulls, pulls)
        for name, n in counters.items():
            self._counters[name] = self._counters.get(name, 0) + n
        for key, n in hourly.items():
            self._hourly[key] = self._hourly.get(key, 0) + n

    async def _flush_loop(self, interval: float, checkpoint: bool = True) -> None:
        checkpoint_every = max(1, int(60 / interval)) if checkpoint else 0
        n = 0
        while True:
            await asyncio.sleep(interval)
            try:
                await self.flush_usage()
                n += 1
                if checkpoint_every and n % checkpoint_every == 0:
                    await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except Exception:  # keep flushing; a failed flush only loses usage counts
                log.exception("index usage flush failed")

    # -- removal and revalidation (`mirror rm`, `mirror invalidate`; see remove.py) ---------------

    async def _batched(self, sql: str, digests: Iterable[str]) -> list[tuple[Any, ...]]:
        """``sql`` (with ``{}`` for the placeholders) over ``digests``, ``VARIABLES`` at a time."""
        items, found = list(digests), []
        for i in range(0, len(items), VARIABLES):
            part = items[i:i + VARIABLES]
            rows = await self._db.execute_fetchall(sql.format(",".join("?" * len(part))), part)
            found += [tuple(r) for r in rows]
        return found

    async def children(self, manifests: Iterable[str]) -> list[tuple[str, str, str]]:
        """(manifest, child, "blob" | "manifest") for what ``manifests`` reference."""
        return await self._batched(
            "SELECT manifest, child, kind FROM manifest_refs WHERE manifest IN ({})", manifests)

    async def referrers(self, digests: Iterable[str]) -> list[tuple[str, str]]:
        """(manifest, child) for every cached manifest referencing one of ``digests``."""
        return await self._batched(
            "SELECT manifest, child FROM manifest_refs WHERE child IN ({})", digests)

    async def untag(self, tags: Iterable[tuple[str, str, str]],
                    links: Iterable[tuple[str, str, str]] = (),
                    pins: Iterable[tuple[str, str, str]] = ()) -> None:
        """Drop tags, repository links and pins, as (upstream, repository, x), at once."""
        where = "WHERE upstream = ? AND repository = ? AND"
        await self._write((f"DELETE FROM tags {where} tag = ?", list(tags)),
                          (f"DELETE FROM repo_links {where} digest = ?", list(links)),
                          (f"DELETE FROM pins {where} reference = ?", list(pins)))

    async def expire_tags(self, tags: Iterable[tuple[str, str, str]]) -> None:
        """Make tags stale now: the next pull of each asks upstream (HEAD) first."""
        await self._write(("UPDATE tags SET expires_at = 0 "
                           "WHERE upstream = ? AND repository = ? AND tag = ?", list(tags)))

    # -- reports (CLI) -------------------------------------------------------------------------
    # Read-only queries for `mirror stats`, `mirror ls` and `mirror pin` (see admin.py).

    async def counters(self) -> dict[str, int]:
        rows = await self._db.execute_fetchall("SELECT name, value FROM counters")
        return {name: value for name, value in rows}

    async def hourly(self, since: float) -> dict[int, dict[str, int]]:
        """The counters by hour (start of the hour, epoch seconds) -> name -> value, for
        the hours from the one ``since`` falls in on, oldest first; what this process
        counted but has not flushed yet is not in it (about a second's worth)."""
        rows = await self._db.execute_fetchall(
            "SELECT hour, name, value FROM hourly WHERE hour >= ? ORDER BY hour, name",
            (int(since) // HOUR * HOUR,))
        found: dict[int, dict[str, int]] = {}
        for hour, name, value in rows:
            found.setdefault(int(hour), {})[name] = int(value)
        return found

    async def totals(self) -> dict[str, int]:
        """How many blobs, manifests, tags and pins the index holds."""
        rows = await self._db.execute_fetchall(
            "SELECT (SELECT count(*) FROM blobs), (SELECT count(*) FROM manifests), "
            "(SELECT count(*) FROM tags), (SELECT count(*) FROM pins)")
        return dict(zip(("blobs", "manifests", "tags", "pins"), next(iter(rows)), strict=True))

    async def linked_sizes(self) -> dict[tuple[str, str], int]:
        """(upstream, repository) -> bytes of cached content linked to it."""
        rows = await self._db.execute_fetchall(
            f"SELECT l.upstream, l.repository, sum({SIZE_OF.format(d='l.digest')}) "
            "FROM repo_links l GROUP BY l.upstream, l.repository")
        return {(u, r): size for u, r, size in rows}

    async def tag_report(self, upstream: str | None = None,
                         repository: str | None = None) -> list[dict[str, Any]]:
        """Every tag (or one repository's): its manifest's media type, the size of its
        closure (the manifest and everything cached it reaches), pulls, pinned or not."""
        rows = await self._db.execute_fetchall(
            """WITH RECURSIVE reach(root, d) AS (
                   SELECT DISTINCT digest, digest FROM tags
                   WHERE (:u IS NULL OR upstream = :u) AND (:r IS NULL OR repository = :r)
                   UNION SELECT reach.root, x.child FROM manifest_refs x
                         JOIN reach ON x.manifest = reach.d),
               closure(root, size) AS (
                   SELECT root, sum({size}) FROM reach GROUP BY root)
               SELECT t.upstream, t.repository, t.tag, t.digest, m.media_type,
                      coalesce(c.size, 0), t.fetched_at, t.expires_at, t.pulls, t.last_pull,
                      EXISTS (SELECT 1 FROM pins p WHERE p.upstream = t.upstream
                              AND p.repository = t.repository AND p.reference IN (t.tag, t.digest))
               FROM tags t LEFT JOIN manifests m ON m.digest = t.digest
               LEFT JOIN closure c ON c.root = t.digest
               WHERE (:u IS NULL OR t.upstream = :u) AND (:r IS NULL OR t.repository = :r)
               ORDER BY t.upstream, t.repository, t.tag""".replace(
                "{size}", SIZE_OF.format(d="reach.d")), {"u": upstream, "r": repository})
        keys = ("upstream", "repository", "tag", "digest", "media_type", "size", "fetched_at",
                "expires_at", "pulls", "last_pull", "pinned")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    async def pins(self, upstream: str | None = None,
                   repository: str | None = None) -> list[tuple[str, str, str, float]]:
        """(upstream, repository, reference, pinned_at) of every pin (or one repository's)."""
        rows = await self._db.execute_fetchall(
            "SELECT upstream, repository, reference, pinned_at FROM pins "
            "WHERE (:u IS NULL OR upstream = :u) AND (:r IS NULL OR repository = :r) "
            "ORDER BY 1, 2, 3", {"u": upstream, "r": repository})
        return [tuple(r) for r in rows]

    async def closure_size(self, digest: str) -> int:
        """Bytes of ``digest`` and everything cached that it reaches through manifest_refs."""
        rows = await self._db.execute_fetchall(
            """WITH RECURSIVE reach(d) AS (
                   SELECT :d UNION
                   SELECT x.child FROM manifest_refs x JOIN reach ON x.manifest = reach.d)
               SELECT sum(coalesce(b.size, m.size, 0)) FROM reach
               LEFT JOIN blobs b ON b.digest = reach.d
               LEFT JOIN manifests m ON m.digest = reach.d""",
            {"d": digest})
        return int(next(iter(rows))[0] or 0)

    async def first_seen(self, digests: Iterable[str]) -> dict[str, float]:
        """When each of ``digests`` (blobs) was first cached (`mirror export --since DATE`)."""
        rows = await self._batched("SELECT digest, first_seen FROM blobs WHERE digest IN ({})",
                                   digests)
        return {d: t for d, t in rows}

    # -- hosted garbage collection (hosted/gc.py) -------------------------------------------------

    async def refresh_links(self, upstream: str, repository: str, digests: Iterable[str],
                            create: bool = False) -> set[str]:
        """Stamp the links of ``digests`` to the repository with the time now (``create``:
        making missing ones), then say which of them are linked and still have their
        blob or manifest row. One write transaction: a hosted gc sweep (which deletes
        under the database's write lock, and only links stamped before its grace) either
        committed before, and then the answer leaves the swept content out, or comes
        after, and then it sees the fresh stamps and leaves the content alone."""
        wanted = list(dict.fromkeys(digests))
        now = time.time()
        async with self._write_lock:
            try:
                if create:
                    await self._db.executemany(
                        "INSERT INTO repo_links (upstream, repository, digest, linked_at) "
                        "VALUES (?, ?, ?, ?) ON CONFLICT (upstream, repository, digest) "
                        "DO UPDATE SET linked_at = excluded.linked_at",
                        [(upstream, repository, d, now) for d in wanted])
                else:
                    await self._db.executemany(
                        "UPDATE repo_links SET linked_at = ? "
                        "WHERE upstream = ? AND repository = ? AND digest = ?",
                        [(now, upstream, repository, d) for d in wanted])
                present: set[str] = set()
                for i in range(0, len(wanted), VARIABLES):
                    part = wanted[i:i + VARIABLES]
                    rows = await self._db.execute_fetchall(
                        "SELECT l.digest FROM repo_links l WHERE l.upstream = ? "
                        f"AND l.repository = ? AND l.digest IN ({','.join('?' * len(part))}) "
                        "AND (EXISTS (SELECT 1 FROM blobs b WHERE b.digest = l.digest) OR "
                        "EXISTS (SELECT 1 FROM manifests m WHERE m.digest = l.digest))",
                        [upstream, repository, *part])
                    present.update(r[0] for r in rows)
                await self._db.commit()
            except BaseException:
                await self._db.rollback()
                raise
        return present

    async def sweep_hosted(self, cutoff: float, delete_untagged: bool,
                           remove_files: Callable[[list[str]], Awaitable[None]],
                           dry_run: bool = False) -> HostedSweep:
        """Hosted garbage collection, all in one write transaction (BEGIN IMMEDIATE, so
        every other writer, in this process or another, waits for it):

        Mark, per hosted repository: its tags, its manifests (all of them; with
        ``delete_untagged`` only those linked at or after ``cutoff``), and everything they
        reference through manifest_refs. Sweep: the repository's links to what is not
        marked and was linked before ``cutoff``. Then the content of a swept link goes
        too (row and file) when nothing else wants it: no link from any repository,
        hosted or cached, no manifest referencing it, and not protected (fresh cached
        tags, pins). A blob a cached repository still links stays, under eviction's
        rules from then on. ``remove_files`` runs before the commit, still holding the
        lock, so no upload can link a blob between its row going and its file going.
        ``dry_run`` rolls everything back and removes no file."""
        result = HostedSweep()
        async with self._write_lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = await self._db.execute_fetchall(
                    """WITH RECURSIVE roots(repo, d) AS (
                           SELECT repository, digest FROM tags WHERE upstream = :h
                           UNION SELECT l.repository, l.digest FROM repo_links l
                                 JOIN manifests m ON m.digest = l.digest
                                 WHERE l.upstream = :h AND (:keep OR l.linked_at >= :cutoff)),
                       live(repo, d) AS (
                           SELECT repo, d FROM roots
                           UNION SELECT live.repo, r.child FROM manifest_refs r
                                 JOIN live ON r.manifest = live.d)
                       SELECT l.repository, l.digest FROM repo_links l
                       WHERE l.upstream = :h AND l.linked_at < :cutoff AND NOT EXISTS
                           (SELECT 1 FROM live WHERE live.repo = l.repository
                            AND live.d = l.digest)""",
                    {"h": HOSTED, "keep": not delete_untagged, "cutoff": cutoff})
                result.links = [(r, d) for r, d in rows]
                await self._db.executemany(
                    "DELETE FROM repo_links WHERE upstream = ? AND repository = ? AND digest = ?",
                    [(HOSTED, r, d) for r, d in result.links])
                # Manifests no repository links any more (a hosted DELETE unlinks them)
                # are candidates too, once older than the grace: with them gone, the
                # blobs only they referenced can go in the same sweep.
                orphans = await self._db.execute_fetchall(
                    "SELECT digest FROM manifests m WHERE first_seen < ? AND NOT EXISTS "
                    "(SELECT 1 FROM repo_links l WHERE l.digest = m.digest)", (cutoff,))
                digests = list({d for _, d in result.links} | {r[0] for r in orphans})
                keep = await self.protected(time.time())
                unlinked = "NOT EXISTS (SELECT 1 FROM repo_links l WHERE l.digest = {t}.digest)"
                unused = "NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.child = {t}.digest)"
                for table, chosen in (("manifests", result.manifests), ("blobs", result.blobs)):
                    found = await self._batched(
                        f"SELECT digest, size FROM {table} t WHERE digest IN ({{}}) AND "
                        + unlinked.format(t="t") + " AND " + unused.format(t="t"), digests)
                    chosen.update((d, s) for d, s in found if d not in keep)
                    gone = [(d,) for d in chosen]
                    await self._db.executemany(f"DELETE FROM {table} WHERE digest = ?", gone)
                    if table == "manifests":
                        await self._db.executemany(
                            "DELETE FROM manifest_refs WHERE manifest = ?", gone)
                        await self._db.executemany("DELETE FROM tags WHERE digest = ?", gone)
                if dry_run:
                    await self._db.rollback()
                else:
                    await remove_files([*result.manifests, *result.blobs])
                    await self._db.commit()
            except BaseException:
                await self._db.rollback()
                raise
        return result


@dataclass
class HostedSweep:
    links: list[tuple[str, str]] = field(default_factory=list)   # (repository, digest)
    blobs: dict[str, int] = field(default_factory=dict)          # removed: digest -> size
    manifests: dict[str, int] = field(default_factory=dict)
