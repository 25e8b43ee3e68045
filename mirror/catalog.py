"""What the web page reads from the index: the repository list (searched, sorted,
paged), one repository's tags and platforms, one image's referrers.

``Catalog`` has its own read connections to the index (``Index.readers``: with SQLite
read-only connections to ``index.db``, WAL: reads never wait for the server's writer,
and the server's one connection, which flushes usage and records fills, never waits
behind a page's big read; with PostgreSQL, the pool's). They are ``Index`` objects, so
the CLI's report queries (``tag_report``, ``pins``, ``closure_size``, ``linked_sizes``,
``repositories``, ``referrers_of``) serve the page as they serve `mirror ls`; SQL
stays in the index.

The repository list needs aggregates over every repository link and tag: a scan of
the index, about 2 s at 100,000 repositories and 600,000 links (bench/web.py). Doing
that per request would make each page view cost seconds of the database's time, so
each process keeps the result (a ``Snapshot``) for ``SNAPSHOT_TTL`` seconds, reads it
once however many requests want it (on a second connection, so other pages' queries
do not queue behind it), makes and sorts its rows in a thread, and serves an older
one (up to ``STALE_MAX``) while the next is read. Searching, sorting and paging then
cost milliseconds in memory. The list shows the index as it was a few seconds ago,
which a screen left open can afford; it is a cache of the index, not state, so each
worker keeping its own loses nothing (workers.py: state lives in the index).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .index import Index
from .models import HOSTED, Referrer, referrers_of_index

log = logging.getLogger("mirror.catalog")

SNAPSHOT_TTL = 10.0       # seconds a repository list is used before it is read again
STALE_MAX = 120.0         # seconds an old one is still shown while the next one is read
PAGE_SIZE = 50
SORTS = ("name", "size", "last_pull", "pulls")


@dataclass(frozen=True, slots=True)
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


def _snapshot(sizes: dict[tuple[str, str], int], with_manifest: list[tuple[str, str]],
              tags: list[Any], display_name: Callable[[str, str], str]) -> Snapshot:
    """The rows, and their order by every key (made here, in a thread, once)."""
    # A repository shows when it has a cached manifest (as `mirror ls`) or a tag.
    repos: dict[tuple[str, str], list[Any]] = {
        key: [sizes.get(key, 0) or 0, 0, 0, None] for key in with_manifest}
    for u, r, n, pulls, last in tags:
        entry = repos.setdefault((u, r), [sizes.get((u, r), 0) or 0, 0, 0, None])
        entry[1:] = [n, pulls or 0, last]
    rows = [RepoRow(u, r, display_name(u, r), size, n, pulls, last)
            for (u, r), (size, n, pulls, last) in repos.items()]
    snap = Snapshot(rows, time.monotonic())
    for key in SORTS:
        snap.ordered(key)
    return snap


@dataclass(frozen=True)
class Page:
    rows: list[RepoRow]
    total: int                # rows matching the search (and the viewer)
    page: int
    pages: int
    taken: float              # when the snapshot was read


class Catalog:
    def __init__(self, index: Index, bulk: Index, display_name: Callable[[str, str], str],
                 ttl: float = SNAPSHOT_TTL) -> None:
        self.index = index            # the pages' queries
        self._bulk = bulk             # the repository list's aggregates, on their own
        self._display_name = display_name
        self._ttl = ttl
        self._snapshot: Snapshot | None = None
        self._reading: asyncio.Task[Snapshot] | None = None

    @classmethod
    async def open(cls, index: Index, display_name: Callable[[str, str], str],
                   ttl: float = SNAPSHOT_TTL) -> Catalog:
        """A catalog reading what ``index`` (the server's) holds, on connections of its own."""
        readers = await index.readers(2)
        return cls(readers[0], readers[1], display_name, ttl)

    async def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
            await asyncio.gather(self._reading, return_exceptions=True)
        await self.index.close()
        await self._bulk.close()

    # -- the repository list -----------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """Every repository with a cached manifest or a tag. Younger than ``ttl``: as it
        is. Older, up to ``STALE_MAX``: as it is, while a fresh one is read in the
        background for the next request (a screen left open never waits). Older still,
        or none yet: read now, one read however many requests wait for it."""
        snap = self._snapshot
        age = None if snap is None else time.monotonic() - snap.taken
        if snap is not None and age is not None and age < self._ttl:
            return snap
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
            self._reading.add_done_callback(self._keep)
        if snap is not None and age is not None and age < STALE_MAX:
            return snap
        # shielded: a client going away does not cancel the read others wait for
        return await asyncio.shield(self._reading)

    def _keep(self, task: asyncio.Task[Snapshot]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._snapshot = task.result()
        elif not task.cancelled():
            log.warning("reading the repository list failed: %s", task.exception())

    async def _read(self) -> Snapshot:
        """The aggregates are the CLI's (`mirror ls`: ``linked_sizes``, ``repositories``)
        and one over the tags, on the second reader connection, so the pages' own
        queries do not queue behind them (the SQL runs in aiosqlite's thread, the
        loop only waits); rows are made and sorted in a thread too."""
        sizes = await self._bulk.linked_sizes()
        with_manifest = await self._bulk.repositories()
        tags = await self._bulk.tag_groups()
        return await asyncio.to_thread(_snapshot, sizes, with_manifest, tags,
                                       self._display_name)

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
        return await self.index.linked_size(upstream, repository)

    async def children(self, manifest: str) -> list[tuple[str, str, int | None]]:
        """What ``manifest`` references: (child, "blob" | "manifest", size or None when
        not cached)."""
        return await self.index.children_sizes(manifest)

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
