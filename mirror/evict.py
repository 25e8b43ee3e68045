"""Keeping the cache inside its budget.

When the cache (plus what fills in progress have announced) passes the high
watermark, least-recently-used content goes until it is under the low watermark.
The budget counts cached bytes only (``LocalCache.cached_size``): content a hosted
repository links is never evicted and does not count against ``max_size``.
Content unused for ``expire_unused`` goes whatever the budget. Never evicted:
anything reachable from a tag inside its TTL or from a pin, and any blob being
served right now. A blob bigger than the high watermark on its own is not
cached at all (``Budget.largest``; the fill streams it through). A manifest goes
with any blob it references, and the manifests above it (an index) and the tags
pointing at it go too, so the index never points at what is not there.

The same ``plan``/``apply`` serve the server's background task and `mirror gc`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import metrics
from .cache import LocalCache
from .config import Config
from .index import HOURLY_KEPT
from .notify import events

log = logging.getLogger("mirror.evict")

RESYNC_INTERVAL = 1.0        # seconds between looks for out-of-process index changes
CHANGES_KEPT = 600.0         # seconds the index's change log keeps a change (for other workers)
ORPHAN_GRACE = 3600.0        # gc leaves unreferenced blobs younger than this (pulls in flight)


@dataclass
class Plan:
    blobs: dict[str, int] = field(default_factory=dict)        # digest -> size
    manifests: dict[str, int] = field(default_factory=dict)
    reason: dict[str, str] = field(default_factory=dict)       # digest -> why

    @property
    def bytes(self) -> int:
        return sum(self.blobs.values()) + sum(self.manifests.values())

    def __len__(self) -> int:
        return len(self.blobs) + len(self.manifests)


@dataclass(frozen=True)
class Budget:
    max_size: int | None
    high: float = 0.9
    low: float = 0.8
    expire_unused: float | None = None

    @property
    def active(self) -> bool:
        """Whether there is anything to enforce (else the evictor never looks)."""
        return self.max_size is not None or self.expire_unused is not None

    @property
    def largest(self) -> int | None:
        """The biggest blob worth caching: one past the high watermark on its own
        could only be kept by evicting everything else, so it is not kept at all."""
        return None if self.max_size is None else int(self.high * self.max_size)

    @classmethod
    def of(cls, config: Config) -> Budget:
        return cls(config.max_size, config.high_watermark, config.low_watermark,
                   config.expire_unused)


async def plan(cache: LocalCache, budget: Budget, *, force: bool = False,
               orphans: bool = False, now: float | None = None) -> Plan:
    """What to remove now. ``force`` evicts down to the low watermark even if the high
    one is not crossed (``mirror gc``); ``orphans`` adds blobs no manifest references."""
    now = time.time() if now is None else now
    used = cache.cached_size + cache.reserved
    over = budget.max_size is not None and (force or used > budget.high * budget.max_size)
    if not (over or orphans or budget.expire_unused is not None):
        return Plan()                 # nothing could be chosen: no need to read the index
    await cache.index.flush_usage()
    keep = await cache.index.protected(now) | cache.in_use()
    rows = [r for r in await cache.index.by_last_access() if r[0] not in keep]
    result = Plan()

    taken = 0       # result.bytes, kept as we go: summing it per row is quadratic

    def take(digest: str, size: int, is_manifest: bool, why: str) -> None:
        nonlocal taken
        chosen = result.manifests if is_manifest else result.blobs
        if digest not in chosen:
            taken += size
        chosen[digest] = size
        result.reason.setdefault(digest, why)

    if budget.expire_unused is not None:
        for digest, size, last, is_manifest in rows:
            if last < now - budget.expire_unused:
                take(digest, size, is_manifest, "unused")
    if orphans:
        for digest, size in await cache.index.orphan_blobs(now - ORPHAN_GRACE):
            if digest not in keep:
                take(digest, size, False, "unreferenced")
    if over and budget.max_size is not None:      # (over says it is set)
        target = budget.low * budget.max_size
        for digest, size, _, is_manifest in rows:
            if used - taken <= target:
                break
            take(digest, size, is_manifest, "lru")
    # A manifest whose blobs (or child manifests) go, goes too, and so on upwards.
    parents = await cache.index.parents([*result.blobs, *result.manifests])
    sizes = {d: s for d, s, _, m in rows if m}
    for digest in parents - keep:
        if digest not in result.manifests and digest in sizes:
            take(digest, sizes[digest], True, "references evicted content")
    return result


async def apply(cache: LocalCache, removal: Plan) -> None:
    # A response may have started reading a planned blob since the plan was made.
    for digest in cache.in_use() & set(removal.blobs):
        del removal.blobs[digest]
    if removal:
        await cache.remove(list(removal.blobs), list(removal.manifests))


class Evictor:
    """The server's background eviction: rung by the cache when it grows, and every
    ``interval`` seconds for unused expiry.

    ``enforce``: this process may evict (worker 0, or the only process); the others only
    resync. ``leading``, with several replicas (mirror/cluster/leader.py): whether this
    process leads the site now, asked before every run; eviction and the pruning of the
    change log and hourly counters happen only while it does, and a process that has
    just become the leader takes a first look at once."""

    def __init__(self, cache: LocalCache, budget: Budget, interval: float = 60.0,
                 enforce: bool = True, follow: bool = False, *,
                 leading: Callable[[], bool] | None = None) -> None:
        self.cache = cache
        self.budget = budget
        self.enforce = enforce          # False: a worker that is not the leader only resyncs
        self.follow = follow            # one of several workers: apply the others' changes
        self._leading = leading
        self._pruned = 0.0
        self.interval = interval
        self.evicted = 0
        self.evicted_bytes = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.cache.largest = self.budget.largest
        if self.enforce:
            self.cache.on_grow = self.poke
            self.cache.make_room = self.make_room
        self._task = asyncio.create_task(self._loop(), name="evictor")
        self._wake.set()                              # a first look at start-up

    async def stop(self) -> None:
        self.cache.on_grow = None
        self.cache.make_room = None
        self.cache.largest = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def over(self) -> bool:
        b = self.budget
        used = self.cache.cached_size + self.cache.reserved
        return b.max_size is not None and used > b.high * b.max_size

    @property
    def leading(self) -> bool:
        """Whether this process runs the chores now."""
        return self.enforce and (self._leading is None or self._leading())

    def poke(self) -> None:
        if self.leading and self.over():
            self._wake.set()

    async def make_room(self) -> None:
        """Called by a fill that has reserved its size: evict first if that crossed the
        high watermark, so the data directory stays inside the budget."""
        if self.leading and self.over():
            try:
                await self.run_once()
            except Exception:
                log.exception("eviction run failed")

    async def run_once(self) -> Plan:
        async with self._lock:
            return await self._run_once()

    async def _run_once(self) -> Plan:
        if not self.budget.active:         # no budget: never scan the index for nothing
            return Plan()
        removal = await plan(self.cache, self.budget)
        if removal:
            await apply(self.cache, removal)
            self.evicted += len(removal)
            self.evicted_bytes += removal.bytes
            metrics.evicted(len(removal), removal.bytes)
            events.evicted(removal.blobs, removal.manifests)
            log.info("evicted %d items, %d bytes; cache now %d bytes (budget %s)", len(removal),
                     removal.bytes, self.cache.size, self.budget.max_size)
        return removal

    async def _loop(self) -> None:
        """Each second: pick up changes `mirror gc`/`pin` made to the index; evict when
        rung, and every ``interval`` seconds for unused expiry."""
        last_run = 0.0
        led = False
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), RESYNC_INTERVAL)
            except TimeoutError:
                pass
            woken = self._wake.is_set()
            self._wake.clear()
            leading = self.leading
            if leading and not led:
                woken = True              # just became the leader: a first look
            led = leading
            try:
                if self.follow:
                    await self.cache.follow_changes()
                if leading and time.monotonic() - self._pruned >= CHANGES_KEPT / 10:
                    self._pruned = time.monotonic()
                    await self.cache.index.prune_changes(time.time() - CHANGES_KEPT)
                    await self.cache.index.prune_hourly(time.time() - HOURLY_KEPT)
                if "pins" in await self.cache.resync_if_changed():
                    woken = True          # an unpin may have made something evictable
                due = woken or time.monotonic() - last_run >= self.interval
                if leading and self.budget.active and due:
                    last_run = time.monotonic()
                    await self.run_once()
            except Exception:        # eviction must never take the server down
                log.exception("eviction run failed")
