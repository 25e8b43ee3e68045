"""The index's logic, written once for both databases (db.Database: SQLite's
sqlite.py, PostgreSQL's postgres.py): blobs, manifests, tags, repository links, pins,
usage and counters (totals, and by the hour for the web page's overview).

Multi-statement writes run in one transaction (``Database.writing``: one writer at a
time, so no other coroutine's statements land inside them). Usage (last access, hits,
tag pulls) and counters are kept in memory and flushed about once a second in one
transaction, so no request waits for a write on a cache hit. The CLI reads and
maintains the same index with its own connection (SQLite's WAL, or PostgreSQL's
MVCC, lets both work at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..models import HOSTED, References, Referrer
from .db import Database, Query
from .sqlite import REFERRERS_PENDING, SqliteDatabase

log = logging.getLogger("mirror.index")

T = TypeVar("T")
GENERATIONS = {"content": "generation", "pins": "pins_generation"}   # kind -> meta key
# The size of digest {d} (a blob's, else a manifest's, else 0): one look in a covering
# index for a blob (coalesce stops at the first value), where two LEFT JOINs looked in both
# tables and then in the blob's row: 6.8 -> 4.1 s of CPU for `mirror stats` at a million.
# (PostgreSQL drops the INDEXED BY hints: postgres.translate.)
SIZE_OF = ("coalesce((SELECT size FROM blobs INDEXED BY blobs_digest_size WHERE digest = {d}), "
           "(SELECT size FROM manifests INDEXED BY manifests_digest_entry WHERE digest = {d}), 0)")
LOAD_BATCH = 10_000  # rows read at a time when loading the maps
VARIABLES = 500     # bound values per statement: far below SQLite's limit on any build
HOUR = 3600
HOURLY_KEPT = 8 * 24 * HOUR   # seconds of hourly counters kept (the leader prunes the rest)


class _DryRun(Exception):
    """Raised inside a write transaction to roll it back (``sweep_hosted(dry_run=True)``)."""


def _shared() -> Callable[[str], str]:
    """One string object for each distinct value passed: the driver hands out a new
    string per row, and a million links name a few thousand upstreams and repositories."""
    seen: dict[str, str] = {}
    return lambda text: seen.setdefault(text, text)


async def _batched(q: Query, sql: str, digests: Iterable[str]) -> list[tuple[Any, ...]]:
    """``sql`` (with ``{}`` for the placeholders) over ``digests``, ``VARIABLES`` at a time."""
    items, found = list(digests), []
    for i in range(0, len(items), VARIABLES):
        part = items[i:i + VARIABLES]
        rows = await q.fetch(sql.format(",".join("?" * len(part))), part)
        found += [tuple(r) for r in rows]
    return found


async def _protected(q: Query, now: float) -> set[str]:
    rows = await q.fetch(
        """WITH RECURSIVE roots(d) AS (
               SELECT digest FROM tags WHERE expires_at > ?
               UNION SELECT digest FROM repo_links WHERE upstream = ?
               UNION SELECT t.digest FROM pins p JOIN tags t ON t.upstream = p.upstream
                     AND t.repository = p.repository AND t.tag = p.reference
               UNION SELECT reference FROM pins WHERE reference LIKE '%:%'),
           live(d) AS (
               SELECT d FROM roots
               UNION SELECT r.child FROM manifest_refs r JOIN live ON r.manifest = live.d)
           SELECT d FROM live""", (now, HOSTED))
    return {r[0] for r in rows}


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
    def __init__(self, db: Database) -> None:
        self.db = db
        self._usage: dict[tuple[str, str], list[float]] = {}   # (table, digest) -> [last, hits]
        self._pulls: dict[tuple[str, str, str], list[float]] = {}   # tag -> [last, pulls]
        self._counters: dict[str, int] = {}
        self._hourly: dict[tuple[int, str], int] = {}   # (hour, name) -> n counted in it
        self._flusher: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path, flush_interval: float = 1.0, flush: bool = True,
                   checkpoint: bool = True) -> Index:
        """The SQLite index at ``path`` (made or upgraded as needed)."""
        return cls.start(await SqliteDatabase.open(path), flush_interval, flush, checkpoint)

    @classmethod
    def start(cls, db: Database, flush_interval: float = 1.0, flush: bool = True,
              checkpoint: bool = True) -> Index:
        """An index on ``db``; ``flush``: flushing usage every ``flush_interval``
        seconds (``checkpoint``: and maintaining the database once a minute)."""
        index = cls(db)
        if flush:
            index._flusher = asyncio.create_task(index._flush_loop(flush_interval, checkpoint))
        return index

    async def for_reports(self) -> None:
        """Tune this connection for the CLI's big reads (``Database.tune_for_reports``)."""
        await self.db.tune_for_reports()

    async def readers(self, n: int) -> list[Index]:
        """``n`` indexes for the web page's reads, on connections of their own (see
        ``Database.readers``); they do not flush usage."""
        return [Index(db) for db in await self.db.readers(n)]

    async def snapshot_read(self, read: Callable[[Any], T]) -> T:
        """``read`` run on a worker thread over one consistent snapshot
        (``Database.snapshot_read``): the cache's maps."""
        found: T = await self.db.snapshot_read(read)
        return found

    async def ping(self) -> None:
        await self.db.fetch("SELECT 1")

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
        await self.db.close()

    # -- loading at start-up ----------------------------------------------------------------

    async def load_blobs(self) -> dict[str, int]:
        rows = await self.db.fetch("SELECT digest, size FROM blobs")
        return {d: s for d, s in rows}

    async def load_manifests(self) -> dict[str, tuple[str, int]]:
        rows = await self.db.fetch("SELECT digest, media_type, size FROM manifests")
        return {d: (mt, s) for d, mt, s in rows}

    async def load_tags(self) -> list[TagRow]:
        rows = await self.db.fetch(
            "SELECT upstream, repository, tag, digest, fetched_at, expires_at FROM tags")
        name = _shared()
        return [TagRow(name(u), name(r), *rest) for u, r, *rest in rows]

    async def load_links(self) -> set[tuple[str, str, str]]:
        """Read in batches, so the memory of each batch's row strings (most of them
        dropped for shared ones) is reused by the next instead of all being held at once."""
        name = _shared()
        links: set[tuple[str, str, str]] = set()
        async for rows in self.db.batches("SELECT upstream, repository, digest FROM repo_links",
                                          LOAD_BATCH):
            links.update((name(u), name(r), d) for u, r, d in rows)
        return links

    # -- the change log: what every write did, for the other worker processes ----------------
    # Triggers append a row to `changes` for each blob, manifest, tag and link added,
    # changed or removed, by any process; each worker reads on from where it was
    # (``changes_since``) and applies them to its maps. The leader prunes old rows.

    async def last_change(self) -> int:
        """The number of the last change made (pruned or not)."""
        return await self.db.last_change()

    async def changes_since(self, seq: int, limit: int = LOAD_BATCH) -> list[Change] | None:
        """The changes after ``seq``, oldest first, at most ``limit``; None when some of
        them were pruned already (the caller reloads everything)."""
        rows = await self.db.fetch(
            "SELECT seq, kind, a, b, c, d, n, x, y FROM changes WHERE seq > ? ORDER BY seq "
            "LIMIT ?", (seq, limit))
        changes = [Change(*row) for row in rows]
        # Numbers are consecutive and in commit order (one writer at a time; SQLite's
        # AUTOINCREMENT, PostgreSQL's counter row, both rolled back with their
        # transaction): a hole after ``seq`` means the rows were pruned before the
        # caller read them.
        if changes:
            return None if changes[0].seq != seq + 1 else changes
        return None if await self.last_change() > seq else []

    async def prune_changes(self, before: float) -> None:
        await self._write(("DELETE FROM changes WHERE at < ?", [(before,)]))

    async def prune_hourly(self, before: float) -> None:
        """Drop the hourly counters of hours that ended before ``before``."""
        await self._write(("DELETE FROM hourly WHERE hour <= ?",
                           [(math.floor(before) - HOUR,)]))

    # -- single rows, for what another worker process may have added --------------------------

    async def blob_size(self, digest: str) -> int | None:
        rows = await self.db.fetch("SELECT size FROM blobs WHERE digest = ?", (digest,))
        return int(rows[0][0]) if rows else None

    async def is_linked(self, upstream: str, repository: str, digest: str) -> bool:
        return bool(await self.db.fetch(
            "SELECT 1 FROM repo_links WHERE upstream = ? AND repository = ? AND digest = ?",
            (upstream, repository, digest)))

    # -- writes (cache misses: not on the hot path) -----------------------------------------

    async def _write(self, *statements: tuple[str, list[tuple[Any, ...]]]) -> None:
        """Run statements (each with its rows, via executemany) as one transaction."""
        async with self.db.writing() as tx:
            for sql, rows in statements:
                if rows:
                    await tx.executemany(sql, rows)

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
            ("INSERT INTO manifest_refs (manifest, child, kind) VALUES (?, ?, ?) "
             "ON CONFLICT DO NOTHING", children))

    async def set_tag(self, row: TagRow) -> None:
        await self._write((
            "INSERT INTO tags (upstream, repository, tag, digest, fetched_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (upstream, repository, tag) "
            "DO UPDATE SET digest = excluded.digest, fetched_at = excluded.fetched_at, "
            "expires_at = excluded.expires_at",
            [(row.upstream, row.repository, row.tag, row.digest, row.fetched_at, row.expires_at)]))

    async def link(self, upstream: str, repository: str, digests: Iterable[str]) -> None:
        now = time.time()
        await self._write(("INSERT INTO repo_links (upstream, repository, digest, linked_at) "
                           "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
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
        rows = await self.db.fetch(
            "SELECT tags, expires_at FROM tag_lists WHERE upstream = ? AND repository = ?",
            (upstream, repository))
        row = next(iter(rows), None)
        if row is None:
            return None
        return json.loads(row[0]), row[1]

    async def repositories(self) -> list[tuple[str, str]]:
        rows = await self.db.fetch(
            # From the manifests (a tenth of the rows) to their links, not every link
            # to the manifests: CROSS JOIN keeps that order (2.2 s -> 0.4 s at a million).
            "SELECT DISTINCT l.upstream, l.repository FROM manifests m "
            "CROSS JOIN repo_links l ON l.digest = m.digest ORDER BY 1, 2")
        return [tuple(r) for r in rows]

    async def add_referrer(self, upstream: str, repository: str, subject: str,
                           referrer: Referrer) -> None:
        """Record that ``referrer`` (a manifest of the repository) names ``subject``."""
        await self._write((
            "INSERT INTO referrers (upstream, repository, subject, digest, media_type, "
            "artifact_type, size, annotations) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (upstream, repository, subject, digest) DO UPDATE SET "
            "media_type = excluded.media_type, artifact_type = excluded.artifact_type, "
            "size = excluded.size, annotations = excluded.annotations",
            [(upstream, repository, subject, referrer.digest, referrer.media_type,
              referrer.artifact_type, referrer.size,
              json.dumps(referrer.annotations) if referrer.annotations else None)]))

    async def referrers_pending(self) -> bool:
        rows = await self.db.fetch("SELECT 1 FROM meta WHERE key = ?", (REFERRERS_PENDING,))
        return bool(rows)

    async def referrers_recorded(self) -> None:
        await self._write(("DELETE FROM meta WHERE key = ?", [(REFERRERS_PENDING,)]))

    async def referrers_of(self, upstream: str, repository: str,
                           subject: str) -> list[Referrer]:
        """The manifests of the repository whose subject is ``subject``: only those
        still linked there (a deleted or collected manifest is no longer a referrer)."""
        rows = await self.db.fetch(
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
            "INSERT INTO referrer_lists VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (upstream, repository, subject) DO UPDATE SET "
            "manifests = excluded.manifests, fetched_at = excluded.fetched_at, "
            "expires_at = excluded.expires_at",
            [(upstream, repository, subject, json.dumps(index), time.time(), expires_at)]))

    async def referrer_list(self, upstream: str, repository: str,
                            subject: str) -> tuple[dict[str, Any], float] | None:
        rows = await self.db.fetch(
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
        return await _protected(self.db, now)

    async def by_last_access(self) -> list[tuple[str, int, float, bool]]:
        """(digest, size, last access, is a manifest) of everything, least recent first."""
        rows = await self.db.fetch(
            "SELECT digest, size, last_access, 0 FROM blobs UNION ALL "
            "SELECT digest, size, last_access, 1 FROM manifests ORDER BY 3")
        return [(d, s, t, bool(m)) for d, s, t, m in rows]

    async def parents(self, digests: Iterable[str]) -> set[str]:
        """Manifests that reference any of ``digests``, and the manifests above them.
        Asked ``VARIABLES`` digests at a time: a plan may hold any number of them."""
        found: set[str] = set()
        frontier = set(digests)
        while frontier:
            above = {r[0] for r in await _batched(
                self.db, "SELECT DISTINCT manifest FROM manifest_refs WHERE child IN ({})",
                frontier)}
            frontier = above - found
            found |= frontier
        return found

    async def orphan_blobs(self, seen_before: float) -> list[tuple[str, int]]:
        """Blobs no cached manifest references (first seen before ``seen_before``)."""
        rows = await self.db.fetch(      # NOT EXISTS: one look in manifest_refs_child per blob
            "SELECT digest, size FROM blobs b WHERE first_seen < ? AND NOT EXISTS "
            "(SELECT 1 FROM manifest_refs r JOIN manifests m ON m.digest = r.manifest "
            "WHERE r.child = b.digest)", (seen_before,))
        return [(d, s) for d, s in rows]

    async def generations(self) -> dict[str, int]:
        """Counters bumped by out-of-process changes, by kind (``GENERATIONS``):
        "content" (`mirror gc`, `verify`: blobs, manifests, tags or links went) tells the
        server to reload its in-memory view; "pins" (`mirror pin`, `unpin`) changes
        nothing it holds in memory."""
        rows = await self.db.fetch(
            f"SELECT key, value FROM meta WHERE key IN ({','.join('?' * len(GENERATIONS))})",
            list(GENERATIONS.values()))
        values = {key: int(value) for key, value in rows}
        return {kind: values.get(key, 0) for kind, key in GENERATIONS.items()}

    async def bump_generation(self, kind: str = "content") -> None:
        await self._write(("INSERT INTO meta VALUES (?, '1') ON CONFLICT (key) "
                           "DO UPDATE SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)",
                           [(GENERATIONS[kind],)]))

    # -- pins ------------------------------------------------------------------------------------

    async def pin(self, upstream: str, repository: str, reference: str) -> None:
        await self._write(("INSERT INTO pins VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                           [(upstream, repository, reference, time.time())]))

    async def unpin(self, upstream: str, repository: str, reference: str) -> bool:
        async with self.db.writing() as tx:
            return await tx.execute(
                "DELETE FROM pins WHERE upstream = ? AND repository = ? AND reference = ?",
                (upstream, repository, reference)) > 0

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
        by_table: dict[str, list[tuple[float, int, str]]] = {"blobs": [], "manifests": []}
        for (table, digest), (last, hits) in usage.items():
            by_table[table].append((last, int(hits), digest))
        write = asyncio.ensure_future(self._write(
            *((f"UPDATE {table} SET last_access = max(last_access, ?), hits = hits + ? "
               "WHERE digest = ?", rows) for table, rows in by_table.items()),
            ("UPDATE tags SET last_pull = ?, pulls = pulls + ? "
             "WHERE upstream = ? AND repository = ? AND tag = ?",
             [(last, int(n), *key) for key, (last, n) in pulls.items()]),
            ("INSERT INTO counters VALUES (?, ?) "
             "ON CONFLICT (name) DO UPDATE SET value = counters.value + excluded.value",
             list(counters.items())),
            ("INSERT INTO hourly VALUES (?, ?, ?) "
             "ON CONFLICT (hour, name) DO UPDATE SET value = hourly.value + excluded.value",
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
                    await self.db.maintain()
            except Exception:  # keep flushing; a failed flush only loses usage counts
                log.exception("index usage flush failed")

    # -- removal and revalidation (`mirror rm`, `mirror invalidate`; see remove.py) ---------------

    async def children(self, manifests: Iterable[str]) -> list[tuple[str, str, str]]:
        """(manifest, child, "blob" | "manifest") for what ``manifests`` reference."""
        return await _batched(
            self.db, "SELECT manifest, child, kind FROM manifest_refs WHERE manifest IN ({})",
            manifests)

    async def referrers(self, digests: Iterable[str]) -> list[tuple[str, str]]:
        """(manifest, child) for every cached manifest referencing one of ``digests``."""
        return await _batched(
            self.db, "SELECT manifest, child FROM manifest_refs WHERE child IN ({})", digests)

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

    # -- reports (CLI, web page) -----------------------------------------------------------------
    # Read-only queries for `mirror stats`, `mirror ls` and `mirror pin` (see admin.py),
    # and the web page's (catalog.py). sum() is cast: PostgreSQL's sum of bigints is a
    # numeric (Decimal in Python).

    async def counters(self) -> dict[str, int]:
        rows = await self.db.fetch("SELECT name, value FROM counters")
        return {name: value for name, value in rows}

    async def hourly(self, since: float) -> dict[int, dict[str, int]]:
        """The counters by hour (start of the hour, epoch seconds) -> name -> value, for
        the hours from the one ``since`` falls in on, oldest first; what this process
        counted but has not flushed yet is not in it (about a second's worth)."""
        rows = await self.db.fetch(
            "SELECT hour, name, value FROM hourly WHERE hour >= ? ORDER BY hour, name",
            (int(since) // HOUR * HOUR,))
        found: dict[int, dict[str, int]] = {}
        for hour, name, value in rows:
            found.setdefault(int(hour), {})[name] = int(value)
        return found

    async def totals(self) -> dict[str, int]:
        """How many blobs, manifests, tags and pins the index holds."""
        rows = await self.db.fetch(
            "SELECT (SELECT count(*) FROM blobs), (SELECT count(*) FROM manifests), "
            "(SELECT count(*) FROM tags), (SELECT count(*) FROM pins)")
        return dict(zip(("blobs", "manifests", "tags", "pins"), rows[0], strict=True))

    async def linked_sizes(self) -> dict[tuple[str, str], int]:
        """(upstream, repository) -> bytes of cached content linked to it."""
        rows = await self.db.fetch(
            f"SELECT l.upstream, l.repository, CAST(sum({SIZE_OF.format(d='l.digest')}) "
            "AS BIGINT) FROM repo_links l GROUP BY l.upstream, l.repository")
        return {(u, r): size for u, r, size in rows}

    async def linked_size(self, upstream: str, repository: str) -> int | None:
        """Bytes linked to one repository (each digest once); None: nothing linked."""
        rows = await self.db.fetch(
            f"SELECT count(*), CAST(sum({SIZE_OF.format(d='l.digest')}) AS BIGINT) "
            "FROM repo_links l WHERE l.upstream = ? AND l.repository = ?",
            (upstream, repository))
        n, size = rows[0]
        return int(size or 0) if n else None

    async def tag_groups(self) -> list[tuple[str, str, int, int, float | None]]:
        """(upstream, repository, tags, pulls, last pull) of every repository with tags."""
        rows = await self.db.fetch(
            "SELECT upstream, repository, count(*), CAST(sum(pulls) AS BIGINT), "
            "max(last_pull) FROM tags GROUP BY upstream, repository")
        return [(u, r, n, p, last) for u, r, n, p, last in rows]

    async def children_sizes(self, manifest: str) -> list[tuple[str, str, int | None]]:
        """What ``manifest`` references: (child, "blob" | "manifest", size or None when
        not cached)."""
        rows = await self.db.fetch(
            f"SELECT x.child, x.kind, {SIZE_OF.format(d='x.child')}, "
            "EXISTS (SELECT 1 FROM blobs b WHERE b.digest = x.child) "
            "OR EXISTS (SELECT 1 FROM manifests m WHERE m.digest = x.child) "
            "FROM manifest_refs x WHERE x.manifest = ?", (manifest,))
        return [(c, k, s if cached else None) for c, k, s, cached in rows]

    async def tag_report(self, upstream: str | None = None,
                         repository: str | None = None) -> list[dict[str, Any]]:
        """Every tag (or one repository's): its manifest's media type, the size of its
        closure (the manifest and everything cached it reaches), pulls, pinned or not."""
        rows = await self.db.fetch(
            """WITH RECURSIVE reach(root, d) AS (
                   SELECT DISTINCT digest, digest FROM tags
                   WHERE (CAST(? AS TEXT) IS NULL OR upstream = ?)
                   AND (CAST(? AS TEXT) IS NULL OR repository = ?)
                   UNION SELECT reach.root, x.child FROM manifest_refs x
                         JOIN reach ON x.manifest = reach.d),
               closure(root, size) AS (
                   SELECT root, CAST(sum({size}) AS BIGINT) FROM reach GROUP BY root)
               SELECT t.upstream, t.repository, t.tag, t.digest, m.media_type,
                      coalesce(c.size, 0), t.fetched_at, t.expires_at, t.pulls, t.last_pull,
                      EXISTS (SELECT 1 FROM pins p WHERE p.upstream = t.upstream
                              AND p.repository = t.repository AND p.reference IN (t.tag, t.digest))
               FROM tags t LEFT JOIN manifests m ON m.digest = t.digest
               LEFT JOIN closure c ON c.root = t.digest
               WHERE (CAST(? AS TEXT) IS NULL OR t.upstream = ?)
               AND (CAST(? AS TEXT) IS NULL OR t.repository = ?)
               ORDER BY t.upstream, t.repository, t.tag""".replace(
                "{size}", SIZE_OF.format(d="reach.d")), (upstream, upstream, repository,
                                                         repository) * 2)
        keys = ("upstream", "repository", "tag", "digest", "media_type", "size", "fetched_at",
                "expires_at", "pulls", "last_pull", "pinned")
        return [dict(zip(keys, (*row[:10], int(row[10])), strict=True)) for row in rows]

    async def pins(self, upstream: str | None = None,
                   repository: str | None = None) -> list[tuple[str, str, str, float]]:
        """(upstream, repository, reference, pinned_at) of every pin (or one repository's)."""
        rows = await self.db.fetch(
            "SELECT upstream, repository, reference, pinned_at FROM pins "
            "WHERE (CAST(? AS TEXT) IS NULL OR upstream = ?) "
            "AND (CAST(? AS TEXT) IS NULL OR repository = ?) "
            "ORDER BY 1, 2, 3", (upstream, upstream, repository, repository))
        return [(u, r, ref, at) for u, r, ref, at in rows]

    async def closure_size(self, digest: str) -> int:
        """Bytes of ``digest`` and everything cached that it reaches through manifest_refs."""
        rows = await self.db.fetch(
            """WITH RECURSIVE reach(d) AS (
                   SELECT CAST(? AS TEXT) UNION
                   SELECT x.child FROM manifest_refs x JOIN reach ON x.manifest = reach.d)
               SELECT CAST(sum(coalesce(b.size, m.size, 0)) AS BIGINT) FROM reach
               LEFT JOIN blobs b ON b.digest = reach.d
               LEFT JOIN manifests m ON m.digest = reach.d""", (digest,))
        return int(rows[0][0] or 0)

    async def first_seen(self, digests: Iterable[str]) -> dict[str, float]:
        """When each of ``digests`` (blobs) was first cached (`mirror export --since DATE`)."""
        rows = await _batched(self.db, "SELECT digest, first_seen FROM blobs WHERE digest IN ({})",
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
        async with self.db.writing() as tx:
            if create:
                await tx.executemany(
                    "INSERT INTO repo_links (upstream, repository, digest, linked_at) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (upstream, repository, digest) "
                    "DO UPDATE SET linked_at = excluded.linked_at",
                    [(upstream, repository, d, now) for d in wanted])
            else:
                await tx.executemany(
                    "UPDATE repo_links SET linked_at = ? "
                    "WHERE upstream = ? AND repository = ? AND digest = ?",
                    [(now, upstream, repository, d) for d in wanted])
            present: set[str] = set()
            for i in range(0, len(wanted), VARIABLES):
                part = wanted[i:i + VARIABLES]
                rows = await tx.fetch(
                    "SELECT l.digest FROM repo_links l WHERE l.upstream = ? "
                    f"AND l.repository = ? AND l.digest IN ({','.join('?' * len(part))}) "
                    "AND (EXISTS (SELECT 1 FROM blobs b WHERE b.digest = l.digest) OR "
                    "EXISTS (SELECT 1 FROM manifests m WHERE m.digest = l.digest))",
                    [upstream, repository, *part])
                present.update(r[0] for r in rows)
        return present

    async def sweep_hosted(self, cutoff: float, delete_untagged: bool,
                           remove_files: Callable[[list[str]], Awaitable[None]],
                           dry_run: bool = False) -> HostedSweep:
        """Hosted garbage collection, all in one write transaction that takes the
        database's write lock first (SQLite's BEGIN IMMEDIATE; PostgreSQL's writer lock,
        postgres.py), so every other writer, in this process or another, waits for it:

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
        try:
            async with self.db.writing(immediate=True) as tx:
                await self._sweep(tx, result, cutoff, delete_untagged)
                if dry_run:
                    raise _DryRun
                await remove_files([*result.manifests, *result.blobs])
        except _DryRun:
            pass
        return result

    async def _sweep(self, tx: Query, result: HostedSweep, cutoff: float,
                     delete_untagged: bool) -> None:
        rows = await tx.fetch(
            """WITH RECURSIVE roots(repo, d) AS (
                   SELECT repository, digest FROM tags WHERE upstream = ?
                   UNION SELECT l.repository, l.digest FROM repo_links l
                         JOIN manifests m ON m.digest = l.digest
                         WHERE l.upstream = ? AND (? OR l.linked_at >= ?)),
               live(repo, d) AS (
                   SELECT repo, d FROM roots
                   UNION SELECT live.repo, r.child FROM manifest_refs r
                         JOIN live ON r.manifest = live.d)
               SELECT l.repository, l.digest FROM repo_links l
               WHERE l.upstream = ? AND l.linked_at < ? AND NOT EXISTS
                   (SELECT 1 FROM live WHERE live.repo = l.repository
                    AND live.d = l.digest)""",
            (HOSTED, HOSTED, not delete_untagged, cutoff, HOSTED, cutoff))
        result.links = [(r, d) for r, d in rows]
        await tx.executemany(
            "DELETE FROM repo_links WHERE upstream = ? AND repository = ? AND digest = ?",
            [(HOSTED, r, d) for r, d in result.links])
        # Manifests no repository links any more (a hosted DELETE unlinks them)
        # are candidates too, once older than the grace: with them gone, the
        # blobs only they referenced can go in the same sweep.
        orphans = await tx.fetch(
            "SELECT digest FROM manifests m WHERE first_seen < ? AND NOT EXISTS "
            "(SELECT 1 FROM repo_links l WHERE l.digest = m.digest)", (cutoff,))
        digests = list({d for _, d in result.links} | {r[0] for r in orphans})
        keep = await _protected(tx, time.time())
        unlinked = "NOT EXISTS (SELECT 1 FROM repo_links l WHERE l.digest = {t}.digest)"
        unused = "NOT EXISTS (SELECT 1 FROM manifest_refs r WHERE r.child = {t}.digest)"
        for table, chosen in (("manifests", result.manifests), ("blobs", result.blobs)):
            found = await _batched(
                tx, f"SELECT digest, size FROM {table} t WHERE digest IN ({{}}) AND "
                + unlinked.format(t="t") + " AND " + unused.format(t="t"), digests)
            chosen.update((d, s) for d, s in found if d not in keep)
            gone = [(d,) for d in chosen]
            await tx.executemany(f"DELETE FROM {table} WHERE digest = ?", gone)
            if table == "manifests":
                await tx.executemany("DELETE FROM manifest_refs WHERE manifest = ?", gone)
                await tx.executemany("DELETE FROM tags WHERE digest = ?", gone)


@dataclass
class HostedSweep:
    links: list[tuple[str, str]] = field(default_factory=list)   # (repository, digest)
    blobs: dict[str, int] = field(default_factory=dict)          # removed: digest -> size
    manifests: dict[str, int] = field(default_factory=dict)
