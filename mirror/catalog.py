"""What the web page reads from the index: the repository list (searched, sorted,
paged), one repository's tags and platforms, one image's referrers.

``Catalog`` has its own read-only connection to ``index.db`` (WAL: reads never wait
for the server's writer, and the server's one connection, which flushes usage and
records fills, never waits behind a page's big read). It wraps that connection in an
``Index`` so the CLI's report queries (``tag_report``, ``pins``, ``closure_size``,
``referrers_of``) serve the page as they serve `mirror ls`.

The repository list is one aggregate over every repository link and tag (a scan of
the index: about a second at a million links), so it is kept for ``SNAPSHOT_TTL``
seconds per process and computed by one request at a time; searching, sorting and
paging then work on that snapshot in memory. A page shows the index as it was up to
a few seconds ago, which is what a screen left open wants; each worker process keeps
its own copy (it is a cache of the index, not state: nothing is lost with it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from .index import SIZE_OF, Index
from .models import HOSTED, Referrer, referrers_of_index

SNAPSHOT_TTL = 10.0       # seconds a repository list is reused before it is read again
PAGE_SIZE = 50
SORTS = ("name", "size", "last_pull", "pulls")


@dataclass(frozen=True)
class RepoRow:
    upstream: str
    repository: str
    name: str                 # what a client pulls (Router.display_name)
    size: int                 # bytes linked to it (each digest once)
    tags: int
    pulls: int
    last_pull: float | None

    @property
    def hosted(self) -> bool:
        return self.upstream == HOSTED


@dataclass
class Snapshot:
    rows: list[RepoRow]
    taken: float
    _orders: dict[str, list[RepoRow]] = field(default_factory=dict)

    def ordered(self, sort: str) -> list[RepoRow]:
        """The rows in ascending ``sort`` order (computed once per snapshot)."""
        found = self._orders.get(sort)
        if found is None:
            key: Callable[[RepoRow], Any] = {
                "name": lambda r: (r.name, r.upstream),
                "size": lambda r: (r.size, r.name),
                "pulls": lambda r: (r.pulls, r.name),
                "last_pull": lambda r: (r.last_pull or 0.0, r.name),
            }[sort]
            found = self._orders[sort] = sorted(self.rows, key=key)
        return found


@dataclass(frozen=True)
class Page:
    rows: list[RepoRow]
    total: int                # rows matching the search (and the viewer)
    page: int
    pages: int
    taken: float              # when the snapshot was read


class Catalog:
    def __init__(self, index: Index, display_name: Callable[[str, str], str],
                 ttl: float = SNAPSHOT_TTL) -> None:
        self.index = index
        self._display_name = display_name
        self._ttl = ttl
        self._snapshot: Snapshot | None = None
        self._reading: asyncio.Task[Snapshot] | None = None

    @classmethod
    async def open(cls, path: Path, display_name: Callable[[str, str], str],
                   ttl: float = SNAPSHOT_TTL) -> Catalog:
        db = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
        try:
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA query_only=1")
        except BaseException:
            await db.close()
            raise
        return cls(Index(db), display_name, ttl)

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        await self.index.close()

    @property
    def _db(self) -> aiosqlite.Connection:
        return self.index._db

    # -- the repository list -----------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Every repository with a cached manifest or a tag, at most ``ttl`` seconds old."""
        snap = self._snapshot
        if snap is not None and time.monotonic() - snap.taken < self._ttl:
            return snap
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        # shielded: a client going away does not cancel the read others wait for
        snap = await asyncio.shield(self._reading)
        self._snapshot = snap
        return snap

    async def _read(self) -> Snapshot:
        links = await self._db.execute_fetchall(
            f"SELECT l.upstream, l.repository, sum({SIZE_OF.format(d='l.digest')}), "
            "max(EXISTS (SELECT 1 FROM manifests INDEXED BY manifests_digest_entry "
            "            WHERE digest = l.digest)) "
            "FROM repo_links l GROUP BY l.upstream, l.repository")
        tags = await self._db.execute_fetchall(
            "SELECT upstream, repository, count(*), sum(pulls), max(last_pull) "
            "FROM tags GROUP BY upstream, repository")
        sizes = {(u, r): (size or 0, manifest) for u, r, size, manifest in links}
        # A repository shows when it has a cached manifest (as `mirror ls`) or a tag.
        repos: dict[tuple[str, str], list[Any]] = {
            key: [size, 0, 0, None] for key, (size, manifest) in sizes.items() if manifest}
        for u, r, n, pulls, last in tags:
            entry = repos.setdefault((u, r), [sizes.get((u, r), (0, 0))[0], 0, 0, None])
            entry[1:] = [n, pulls or 0, last]
        name = self._display_name
        rows = [RepoRow(u, r, name(u, r), size, n, pulls, last)
                for (u, r), (size, n, pulls, last) in repos.items()]
        return Snapshot(rows, time.monotonic())

    async def page(self, q: str = "", sort: str = "name", descending: bool = False,
                   page: int = 1, may_pull: Callable[[str, str], bool] | None = None,
                   per_page: int = PAGE_SIZE) -> Page:
        """One page of the repositories whose name contains ``q`` (any case) and that
        ``may_pull`` allows, in ``sort`` order."""
        snap = await self.snapshot()
        rows = snap.ordered(sort)
        if descending:
            rows = rows[::-1]
        needle = q.strip().lower()
        if needle:
            rows = [r for r in rows if needle in r.name.lower()]
        if may_pull is not None:
            rows = [r for r in rows if may_pull(r.upstream, r.repository)]
        pages = max(1, -(-len(rows) // per_page))
        page = min(max(1, page), pages)
        start = (page - 1) * per_page
        return Page(rows[start:start + per_page], len(rows), page, pages, snap.taken)

    # -- one repository ----------------------------------------------------------------------

    async def linked_size(self, upstream: str, repository: str) -> int | None:
        """Bytes linked to the repository (each digest once); None: nothing linked."""
        rows = await self._db.execute_fetchall(
            f"SELECT count(*), sum({SIZE_OF.format(d='l.digest')}) FROM repo_links l "
            "WHERE l.upstream = ? AND l.repository = ?", (upstream, repository))
        n, size = next(iter(rows))
        return int(size or 0) if n else None

    async def children(self, manifest: str) -> list[tuple[str, str, int | None]]:
        """What ``manifest`` references: (child, "blob" | "manifest", size or None when
        not cached)."""
        rows = await self._db.execute_fetchall(
            f"SELECT x.child, x.kind, {SIZE_OF.format(d='x.child')}, "
            "EXISTS (SELECT 1 FROM blobs b WHERE b.digest = x.child) "
            "OR EXISTS (SELECT 1 FROM manifests m WHERE m.digest = x.child) "
            "FROM manifest_refs x WHERE x.manifest = ?", (manifest,))
        return [(c, k, s if cached else None) for c, k, s, cached in rows]

    async def referrers(self, upstream: str, repository: str, subject: str) -> list[Referrer]:
        """Referrers of ``subject`` known here: recorded ones (hosted pushes) and the
        list last fetched from upstream (cached repositories)."""
        found = {r.digest: r for r in await self.index.referrers_of(upstream, repository,
                                                                    subject)}
        if upstream != HOSTED:
            cached = await self.index.referrer_list(upstream, repository, subject)
            if cached is not None:
                for r in referrers_of_index(cached[0]):
                    found.setdefault(r.digest, r)
        return sorted(found.values(), key=lambda r: r.digest)
