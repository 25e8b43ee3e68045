"""LocalCache: content-addressed blobs in a blob store, and the index.

Layout::

    data_dir/blobs/sha256/ab/ab12...   every blob and manifest, named by its digest
                                       (or the same keys in a bucket: ``storage: {s3: ...}``)
    data_dir/tmp/                      files being written; removed at start-up
    data_dir/index.db                  the SQLite index (unless index.postgres is set)
    data_dir/lock                      the running server's PID, flock'ed (lock.py)
    data_dir/quarantine/               what `mirror verify --quarantine` set aside

Where the bytes live is the blob store's business (mirror/storage: ``FsStore``, the
default, or ``S3Blobs``). Every blob is written into a temp file under ``tmp/`` and
hashed there; it is committed to the store only when the hash matched (a file renamed
into ``blobs/``, or an upload completed), and the index names it only once the
store has it durably, so a power loss never leaves a row naming wrong bytes. Paths
are built from validated digests only, never request text.
Hot lookups (blob present, tag -> digest, repository links) are answered from
in-memory maps (packed: ``cache_maps``) loaded at start-up and kept in step with the
index; a reload builds new ones on a worker thread. The file
objects (``TempBlob`` being written, ``CachedBlob`` being read) and the disk calls
behind the durability rules are in ``cache_files``.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import shutil
import sqlite3
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from . import cache_maps, fileio, lock
from .cache_files import CachedBlob as CachedBlob
from .cache_files import TempBlob as TempBlob
from .cache_files import remove_later, scan_blobs
from .config_scale import IndexConfig, StorageConfig
from .errors import DigestInvalid
from .index import (
    LOAD_BATCH,
    SQLITE,
    Change,
    Index,
    IndexUnavailable,
    TagRow,
    open_index,
    where,
)
from .models import (
    HOSTED,
    Manifest,
    ManifestInfo,
    References,
    Referrer,
    referrers_index,
    referrers_of_index,
)
from .storage import BlobStore, StorageUnavailable, StoredBlob, open_store

log = logging.getLogger("mirror.cache")

DEFAULT_STORAGE = StorageConfig()     # blobs are files under data_dir/blobs
MANIFEST_MEMORY = 64 * 1024 * 1024   # bytes of hot manifests kept in memory


class CannotOpen(Exception):
    """The data directory or its index cannot be used; the message is one line that
    names the path and says what to do."""


@asynccontextmanager
async def existing(data_dir: Path, *,
                   storage: StorageConfig = DEFAULT_STORAGE,
                   index: IndexConfig = SQLITE) -> AsyncIterator[LocalCache]:
    """The cache in ``data_dir`` (and ``index``) opened beside a running server
    (``server=False``), for the maintenance, export and import commands; CannotOpen
    when there is none."""
    if index.postgres is None and not (Path(data_dir) / "index.db").is_file():
        raise CannotOpen(f"no cache in {data_dir} (no index.db there); "
                         "check --data-dir or data_dir in the config")
    cache = await LocalCache.open(data_dir, server=False, storage=storage, index=index)
    try:
        yield cache
    finally:
        await cache.close()


def unusable(data_dir: Path, exc: BaseException, path: Path | None = None) -> str:
    """One line for a data directory (or its ``index.db``, ``path``) that cannot be
    opened: what failed, where, and what to do about it."""
    if isinstance(exc, IndexUnavailable) and exc.__cause__ is not None:
        exc = exc.__cause__
    where = Path(getattr(exc, "filename", None) or path or data_dir)
    fix = f"or choose another data_dir (now {data_dir})"
    if isinstance(exc, IndexUnavailable):
        return f"{where}: {exc}"
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        if "readonly" in text or "unable to open" in text:
            return (f"{where}: {text}: the mirror (uid {os.getuid()}) must be able to write "
                    f"it and its directory; fix their owner or mode, {fix}")
        if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
            return (f"{where}: {text}: not the mirror's index, or damaged; move it away to "
                    f"start with an empty cache, {fix}")
        return f"{where}: {text}"
    reason = getattr(exc, "strerror", None) or str(exc)
    if isinstance(exc, PermissionError) or getattr(exc, "errno", None) == errno.EROFS:
        return (f"{where}: {reason}: the mirror (uid {os.getuid()}) cannot write to its data "
                f"directory; fix the owner or mode, {fix}")
    if getattr(exc, "errno", None) in (errno.ENOTDIR, errno.EEXIST):
        return f"{where}: {reason}: a file is in the way of the data directory: move it, {fix}"
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return f"{where}: {reason}: free some space, {fix}"
    return f"{where}: {reason}"


@dataclass
class _Touched:
    """What the maps were changed at while new ones were being loaded (``resync``)."""

    blobs: set[str] = field(default_factory=set)
    manifests: set[str] = field(default_factory=set)
    tags: set[tuple[str, str, str]] = field(default_factory=set)
    links: set[tuple[str, str, str]] = field(default_factory=set)


class LocalCache:
    def __init__(self, data_dir: Path, index: Index, store: BlobStore | None = None) -> None:
        self.data_dir = data_dir
        self.index = index
        self.store: BlobStore = store if store is not None else open_store(data_dir,
                                                                           DEFAULT_STORAGE)
        # The maps (packed: cache_maps), and the totals the map changes below keep in step:
        # _bytes is what `size` says, _hosted_bytes what `hosted_size` says.
        self._install(cache_maps.Maps())
        self._touched: _Touched | None = None       # recording, while a resync loads
        self._loading = asyncio.Lock()
        self._hot: OrderedDict[str, bytes] = OrderedDict()
        self._hot_bytes = 0
        self._temp_seq = 0
        self._readers: Counter[str] = Counter()     # digest -> responses reading it now
        self.reserved = 0                           # bytes of fills not yet committed
        self._generations: dict[str, int] = {}      # index.generations() when last looked
        self._resyncing = asyncio.Lock()
        self._change_seq = 0                        # the index's change log, read up to here
        self.follow = False                         # other workers write the index too
        self.largest: int | None = None             # a bigger blob is passed through uncached
        self.on_grow: Callable[[], None] | None = None   # the evictor's doorbell
        self.make_room: Callable[[], Awaitable[None]] | None = None
        self._lock: lock.DataDirLock | None = None

    @classmethod
    async def open(cls, data_dir: Path, server: bool = True, prepare: bool = True,
                   own_lock: bool = True, leader: bool = True,
                   previous_pid: int | None = None, *,
                   storage: StorageConfig = DEFAULT_STORAGE,
                   index: IndexConfig = SQLITE) -> LocalCache:
        """Open the cache. The server (``server=True``) owns the data directory: it
        clears leftover temp files and, after an unclean stop, reconciles files with the
        index. The CLI opens with ``server=False`` and touches neither, so it is safe
        beside a running server. A server of several workers (workers.py) prepares once,
        in its first worker (``prepare``), holds the data directory's lock in the
        supervisor (``own_lock`` False in the workers: the supervisor then says whether
        the previous server stopped cleanly, ``previous_pid``), and checkpoints the index
        in its ``leader`` only. ``storage``: where the blobs live (the data directory, or
        an object store; an unusable one is CannotOpen naming its config key).
        ``index``: where the index is (SQLite's index.db in the data directory, or
        PostgreSQL)."""
        data_dir = Path(data_dir).resolve()
        held = None
        prepare = prepare and server

        def make_ready() -> None:
            nonlocal held
            if server and own_lock:   # before tmp/ is cleared: it may hold another server's fills
                held = lock.hold(data_dir)
            (data_dir / "blobs").mkdir(parents=True, exist_ok=True)
            tmp = data_dir / "tmp"
            if tmp.exists() and prepare:
                shutil.rmtree(tmp)       # partial fills of an earlier run
            tmp.mkdir(exist_ok=True)
        try:
            await fileio.run(make_ready)
        except OSError as exc:
            raise CannotOpen(unusable(data_dir, exc)) from None
        config = index
        try:
            store = open_store(data_dir, storage)
            await store.check()
        except StorageUnavailable as exc:
            if held is not None:
                held.release()
            raise CannotOpen(str(exc)) from None
        try:
            opened = await open_index(data_dir, config, flush=server, checkpoint=leader)
        except (IndexUnavailable, OSError) as exc:
            if held is not None:
                held.release()
            raise CannotOpen(cls._unusable(data_dir, config, exc)) from None
        cache = cls(data_dir, opened, store)
        try:
            if not server:
                await opened.for_reports()
            await cache.resync()
            # After a clean stop the files and the index agree: a row is written only
            # once its file's bytes are on disk, and what a crash would leave (a file
            # renamed in but never indexed, a row whose file went) needs a crash. So
            # only an unclean stop costs the walk of every file (seconds at a million).
            if prepare and own_lock:
                held = held or lock.held(data_dir)
                previous_pid = held.previous_pid if held is not None else None
            if prepare and previous_pid is not None and not store.local_files:
                log.warning("the previous mirror on %s (pid %d) did not stop cleanly; the "
                            "start-up check of files against the index does not apply to "
                            "blobs in %s (skipped): run `mirror verify` to re-hash them",
                            data_dir, previous_pid, store.name)
            elif prepare and previous_pid is not None:
                log.warning("the previous mirror on %s (pid %d) did not stop cleanly; "
                            "files are checked against the index by size at start-up, "
                            "run `mirror verify` to re-hash them", data_dir, previous_pid)
                if await cache._reconcile():
                    await cache.resync()
        except (IndexUnavailable, OSError) as exc:
            await opened.close()
            raise CannotOpen(cls._unusable(data_dir, config, exc)) from None
        except BaseException:
            await opened.close()
            raise
        cache._lock = held
        log.info("cache at %s: %d blobs, %d manifests, %d tags; blobs in %s", data_dir,
                 len(cache._blobs), len(cache._manifests), len(cache._tags),
                 store.describe() if hasattr(store, "describe") else store.name)
        return cache

    @staticmethod
    def _unusable(data_dir: Path, config: IndexConfig, exc: BaseException) -> str:
        if config.postgres is None or not isinstance(exc, IndexUnavailable):
            return unusable(data_dir, exc, data_dir / "index.db")
        return f"{where(data_dir, config)}: {exc}"

    async def _reconcile(self) -> bool:
        """Make the index and the files agree after a crash: rows whose file is gone or
        has the wrong size are dropped; files with no row (renamed in, then killed
        before the index write) and anything that is not a digest-named file are removed.
        Whether rows were dropped (then the maps need a reload: loading a million rows
        takes seconds, so a clean start loads them once).

        Sizes only, by choice: files are preallocated, so a size proves nothing about
        the bytes, but a row is committed only after its file's bytes were synced (see
        ``_place``), so a row never outlives its bytes. Re-hashing everything on every
        unclean start would hold start-up for as long as the cache is big; deep checking
        is ``mirror verify``, which the start-up log suggests after an unclean stop."""
        def expected(digest: str) -> int | None:
            size = self._blobs.get(digest)
            return size if size is not None else (self._manifests.get(digest) or ("", None))[1]

        present, removed = await fileio.run(scan_blobs, self.data_dir / "blobs", expected)
        present_set = set(present)
        gone_blobs = [d for d in self._blobs if d not in present_set]
        gone_manifests = [d for d in self._manifests if d not in present_set]
        if gone_blobs or gone_manifests:
            await self.index.forget(gone_blobs, gone_manifests)   # open() reloads the maps
        if removed or gone_blobs or gone_manifests:
            log.warning("reconciled cache with index: removed %d stray files, forgot %d blobs "
                        "and %d manifests whose files were missing", removed, len(gone_blobs),
                        len(gone_manifests))
        return bool(gone_blobs or gone_manifests)

    async def resync_if_changed(self) -> set[str]:
        """Pick up what another process changed in the index; the kinds of change seen.
        "content" (`mirror gc`, `verify`) reloads the maps; "pins" (`mirror pin`, `unpin`)
        reloads nothing (eviction reads pins from the index each time)."""
        async with self._resyncing:
            generations = await self.index.generations()
            changed = {kind for kind, value in generations.items()
                       if value != self._generations.get(kind)}
            if "content" in changed:
                await self.resync()
            self._generations["pins"] = generations["pins"]
            return changed

    async def changed_elsewhere(self) -> bool:
        """On a miss: whether another process (`mirror import`, another worker) added
        content since the maps were loaded; if so they are brought up to date now, and
        the lookup is worth a retry. (The periodic look would see it too, a second or
        so later: too late for a client that pushed to one worker and pulls from another.)"""
        applied = await self.catch_up()
        return "content" in await self.resync_if_changed() or applied > 0

    async def catch_up(self) -> int:
        """One of several workers (``follow``): apply the others' changes now; how many."""
        return await self.follow_changes() if self.follow else 0

    async def follow_changes(self) -> int:
        """Apply what other processes (the other workers of this server) changed in
        the index since the last look, from its change log; how many changes. When
        the log was pruned past the last look, everything is reloaded instead."""
        applied = 0
        async with self._resyncing:
            while True:
                changes = await self.index.changes_since(self._change_seq)
                if changes is None:
                    log.warning("the index's change log was pruned past this process's last "
                                "look; reloading the cache's maps")
                    await self.resync()
                    return applied
                for change in changes:
                    self._apply(change)
                applied += len(changes)
                if changes:
                    self._change_seq = changes[-1].seq
                if len(changes) < LOAD_BATCH:
                    return applied

    def _apply(self, change: Change) -> None:
        """One change from the log, made to the maps (the same change made here
        already, or again, changes nothing)."""
        kind, a, b, c = change.kind, change.a or "", change.b or "", change.c or ""
        if kind == "blob":
            new = a not in self._blobs
            self._set_blob(a, change.n or 0)
            if new:
                self._grew()
        elif kind == "blob-":
            self._set_blob(a, None)
        elif kind == "manifest":
            if a not in self._manifests:
                self._set_manifest(a, (b, change.n or 0))
                self._grew()
        elif kind == "manifest-":
            self._set_manifest(a, None)
            if a in self._hot:
                self._hot_bytes -= len(self._hot.pop(a))
        elif kind == "tag":
            self._tags[(a, b, c)] = TagRow(a, b, c, change.d or "", change.x or 0.0,
                                           change.y or 0.0)
            self._touch(tags=[(a, b, c)])
        elif kind == "tag-":
            self._tags.pop((a, b, c), None)
            self._touch(tags=[(a, b, c)])
        elif kind == "link":
            if (a, b, c) not in self._links:
                self._links.add((a, b, c))
                self._touch(links=[(a, b, c)])
                if a == HOSTED:
                    self._host([c])
        elif kind == "link-":
            if (a, b, c) in self._links:
                self._links.discard((a, b, c))
                self._touch(links=[(a, b, c)])
                if a == HOSTED:
                    self._unhost(c)

    async def resync(self) -> None:
        """(Re)load the in-memory maps from the index, e.g. after `mirror gc` ran.

        New maps are built on a worker thread (seconds at a million rows; the event
        loop serves meanwhile from the old ones) and swapped in. What this process
        changed in the old maps while they loaded is then carried over to the new ones,
        so a blob committed or a tag set meanwhile is not forgotten."""
        async with self._loading:
            self._change_seq = await self.index.last_change()   # first: replaying is harmless
            generations = await self.index.generations()
            self._generations.setdefault("pins", generations["pins"])
            self._generations["content"] = generations["content"]
            self._touched = _Touched()
            try:
                maps = await self.index.snapshot_read(cache_maps.read)
            finally:
                touched, self._touched = self._touched, None
            old = self._maps
            self._install(maps)
            self._carry_over(old, touched)
            del old, maps
            await fileio.run(cache_maps.give_back_memory)
        for digest in [d for d in self._hot if d not in self._manifests]:
            self._hot_bytes -= len(self._hot.pop(digest))
        # The tags map holds objects by the ten thousand, and each of Python's full
        # cyclic collections walked them all (a 120 ms stall of the event loop at a
        # million blobs when every map held objects). They form no cycles (refcounting
        # frees what a reload drops), so they are moved out of the collector's sight.
        gc.freeze()

    def _install(self, maps: cache_maps.Maps) -> None:
        self._maps = maps
        self._blobs, self._manifests, self._tags = maps.blobs, maps.manifests, maps.tags
        self._links, self._hosted = maps.links, maps.hosted
        self._bytes, self._hosted_bytes = maps.size, maps.hosted_size

    def _carry_over(self, old: cache_maps.Maps, touched: _Touched) -> None:
        """Make the new maps say what the old ones say about what ``touched`` names."""
        for digest in touched.blobs:
            self._set_blob(digest, old.blobs.get(digest))
        for digest in touched.manifests:
            self._set_manifest(digest, old.manifests.get(digest))
        for key in touched.tags:
            row = old.tags.get(key)
            if row is None:
                self._tags.pop(key, None)
            else:
                self._tags[key] = row
        for link in touched.links:
            was, now = link in old.links, link in self._links
            if was and not now:
                self._links.add(link)
                if link[0] == HOSTED:
                    self._host([link[2]])
            elif now and not was:
                self._links.discard(link)
                if link[0] == HOSTED:
                    self._unhost(link[2])

    async def close(self) -> None:
        await self.index.close()
        if self._lock is not None:       # the server's clean stop
            self._lock.release()

    async def not_ready(self) -> str | None:
        """Why the cache cannot serve (None when it can): the index answers, the blob
        store answers and the data directory takes files."""
        try:
            await self.index.ping()
        except Exception as exc:
            return f"index: {exc}"
        problem = await self.store.not_ready()
        if problem is not None:
            return problem
        if not await fileio.run(os.access, self.data_dir / "tmp", os.W_OK):
            return f"data directory {self.data_dir} is not writable"
        return None

    def contents(self) -> list[tuple[str, int, bool]]:
        """(digest, size, is a manifest) of everything cached."""
        return [*((d, s, False) for d, s in self._blobs.items()),
                *((d, s, True) for d, (_, s) in self._manifests.items())]

    def fits(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes may be cached at all: one bigger than the
        budget holds (``largest``, set by the evictor) is streamed through instead,
        evicting nothing."""
        return self.largest is None or size <= self.largest

    @property
    def size(self) -> int:
        """Bytes of blobs and manifests in the data directory, hosted and cached."""
        return self._bytes

    @property
    def hosted_size(self) -> int:
        """Bytes of blobs and manifests linked to a hosted repository (stored once
        however many repositories, hosted or cached, link them)."""
        return self._hosted_bytes

    def recount(self) -> tuple[int, int]:
        """(size, hosted_size) summed over the maps: O(n), so only at a (re)load. Every
        other change goes through ``_set_blob``, ``_set_manifest``, ``_host`` and
        ``_unhost``, which keep the two totals in step."""
        return (sum(self._blobs.values()) + sum(s for _, s in self._manifests.values()),
                sum(self._stored(d) for d in self._hosted))

    def _stored(self, digest: str) -> int:
        """What a hosted digest counts for: its blob's size, else its manifest's."""
        return self._blobs.get(digest) or (self._manifests.get(digest) or ("", 0))[1]

    def _set_blob(self, digest: str, size: int | None) -> None:
        """Record (``size``) or drop (None) a blob in the map, and in the totals."""
        if self._touched is not None:
            self._touched.blobs.add(digest)
        hosted = digest in self._hosted
        if hosted:
            self._hosted_bytes -= self._stored(digest)
        old = self._blobs.pop(digest, None)
        if size is not None:
            self._blobs[digest] = size
        self._bytes += (size or 0) - (old or 0)
        if hosted:
            self._hosted_bytes += self._stored(digest)

    def _set_manifest(self, digest: str, entry: tuple[str, int] | None) -> None:
        """Record (media type, size) or drop (None) a manifest, in the map and totals."""
        if self._touched is not None:
            self._touched.manifests.add(digest)
        hosted = digest in self._hosted
        if hosted:
            self._hosted_bytes -= self._stored(digest)
        old = self._manifests.pop(digest, None)
        if entry is not None:
            self._manifests[digest] = entry
        self._bytes += (entry[1] if entry else 0) - (old[1] if old else 0)
        if hosted:
            self._hosted_bytes += self._stored(digest)

    def _host(self, digests: Iterable[str]) -> None:
        """One more hosted repository links each of ``digests``."""
        for digest in digests:
            if digest not in self._hosted:
                self._hosted_bytes += self._stored(digest)
            self._hosted[digest] += 1

    def _touch(self, tags: Iterable[tuple[str, str, str]] = (),
               links: Iterable[tuple[str, str, str]] = ()) -> None:
        """Note tags and links changed while a resync loads (``_set_blob`` and
        ``_set_manifest`` note theirs)."""
        if self._touched is not None:
            self._touched.tags.update(tags)
            self._touched.links.update(links)

    def _unhost(self, digest: str) -> None:
        """One hosted repository fewer links ``digest``."""
        if digest not in self._hosted:
            return
        self._hosted[digest] -= 1
        if self._hosted[digest] <= 0:
            del self._hosted[digest]
            self._hosted_bytes -= self._stored(digest)

    @property
    def cached_size(self) -> int:
        """Bytes of content no hosted repository links: what the budget counts."""
        return self.size - self.hosted_size

    # -- eviction support ------------------------------------------------------------------

    def hold(self, digest: str) -> None:
        self._readers[digest] += 1

    def release(self, digest: str) -> None:
        self._readers[digest] -= 1
        if self._readers[digest] <= 0:
            del self._readers[digest]

    def in_use(self) -> set[str]:
        return set(self._readers)

    async def delete_files(self, digests: list[str]) -> None:
        """Delete the blobs ``digests`` from the store (files or objects; those already
        gone are fine), off the loop; finishes even if the caller is cancelled."""
        await self.store.delete(list(digests))

    async def remove(self, blobs: list[str], manifests: list[str]) -> None:
        """Delete files and index rows (and tags pointing at removed manifests)."""
        await self.index.forget(blobs, manifests)
        await self.delete_files([*blobs, *manifests])
        for d in blobs:
            self._set_blob(d, None)
        gone = set(manifests)
        for d in gone:
            self._set_manifest(d, None)
            if d in self._hot:
                self._hot_bytes -= len(self._hot.pop(d))
        for key in [k for k, row in self._tags.items() if row.digest in gone]:
            del self._tags[key]
            self._touch(tags=[key])

    async def learn_blob(self, digest: str) -> bool:
        """Whether the index has blob ``digest`` and its file is there, learning it into
        the maps if so: another worker process (or `mirror import`) may have added it
        since they were loaded. Asked on a miss, before going upstream."""
        if digest in self._blobs:
            return True
        size = await self.index.blob_size(digest)
        if size is None or await self.store.size(digest) is None:
            return False
        if digest not in self._blobs:
            self._set_blob(digest, size)
            self._grew()
        return True

    async def learn_link(self, upstream: str, repository: str, digest: str) -> bool:
        """Whether the index links ``digest`` to the repository (another worker may have
        linked it), learning the link if so."""
        if (upstream, repository, digest) in self._links:
            return True
        if not await self.index.is_linked(upstream, repository, digest):
            return False
        if (upstream, repository, digest) not in self._links:
            self._links.add((upstream, repository, digest))
            self._touch(links=[(upstream, repository, digest)])
            if upstream == HOSTED:
                self._host([digest])
        return True

    def vanished(self, digest: str) -> None:
        """A file the maps listed is gone (removed by `mirror gc` beside the server)."""
        log.warning("blob %s vanished from the cache; it will be fetched again", digest)
        self._set_blob(digest, None)

    def _grew(self) -> None:
        if self.on_grow is not None:
            self.on_grow()

    # -- paths -----------------------------------------------------------------------------

    def path_for(self, digest: str) -> Path:
        """The committed blob's file (a file-system store only: ``store.local_files``)."""
        return Path(self.store.path_for(digest))

    # -- read side -------------------------------------------------------------------------

    def blob_size(self, digest: str) -> int | None:
        return self._blobs.get(digest)

    def manifest_info(self, digest: str) -> ManifestInfo | None:
        entry = self._manifests.get(digest)
        return ManifestInfo(digest, entry[0], entry[1]) if entry else None

    async def read_manifest(self, digest: str) -> Manifest | None:
        info = self.manifest_info(digest)
        if info is None:
            return None
        data = self._hot.get(digest)
        if data is None:
            data = await self.store.read_small(digest)
            if data is None:
                log.warning("manifest %s vanished from the cache; it will be fetched again",
                            digest)
                self._set_manifest(digest, None)
                return None
            self._remember(digest, data)
        else:
            self._hot.move_to_end(digest)
        self.index.touch(digest, manifest=True)
        return Manifest(data, info.media_type, digest)

    def _remember(self, digest: str, data: bytes) -> None:
        self._hot[digest] = data
        self._hot_bytes += len(data)
        while self._hot_bytes > MANIFEST_MEMORY and self._hot:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= len(old)

    def tag(self, upstream: str, repository: str, tag: str) -> TagRow | None:
        return self._tags.get((upstream, repository, tag))

    def tags_of(self, upstream: str, repository: str) -> list[str]:
        return sorted(t for (u, r, t) in self._tags if u == upstream and r == repository)

    def count_pull(self, upstream: str, repository: str, tag: str) -> None:
        self.index.count_pull(upstream, repository, tag)

    def linked(self, upstream: str, repository: str, digest: str) -> bool:
        return (upstream, repository, digest) in self._links

    async def open_blob(self, digest: str) -> StoredBlob | None:
        """The cached blob, opened and held; None if it is not (or no longer) there."""
        size = self._blobs.get(digest)
        if size is None:
            return None
        self.hold(digest)
        try:
            opened = await self.store.open(digest, size, self)
        except BaseException:
            self.release(digest)
            raise
        if opened is None:
            self.release(digest)
            self.vanished(digest)
            return None
        self.index.touch(digest)
        return opened

    # -- write side ------------------------------------------------------------------------

    async def new_temp(self, algorithm: str = "sha256", *,
                       digest: str | None = None) -> TempBlob:
        """A temp file for a new blob. ``digest`` (the blob it should turn out to be): a
        store that is not the file system gets the bytes as they are written (the tee)."""
        self._temp_seq += 1
        path = self.data_dir / "tmp" / f"{os.getpid()}-{self._temp_seq}-{time.monotonic_ns()}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        fd = await fileio.run(os.open, path, flags, 0o644)
        upload = None
        if digest is not None and not self.store.local_files:
            try:
                upload = await self.store.upload(digest)
            except BaseException:
                await fileio.run_to_end(os.close, fd)
                await fileio.run_to_end(remove_later, path)
                raise
        return TempBlob(path, fd, algorithm, upload)

    async def commit_blob(self, temp: TempBlob, digest: str) -> int:
        """Make ``temp`` the blob ``digest`` if its bytes hash to it; else discard it."""
        await self._place(temp, digest)
        self._set_blob(digest, temp.size)
        await self._persist(self.index.add_blob(digest, temp.size), f"blob {digest}")
        self._grew()
        return temp.size

    async def pass_through(self, temp: TempBlob, digest: str, owner: object) -> None:
        """Verify a blob that is not to be cached (too big for the budget) and leave its
        temp file for readers: it is removed once ``owner`` (the fill they read through)
        is gone, and at the next start-up at the latest."""
        if temp.digest != digest:
            await temp.discard()
            raise DigestInvalid(f"content hashed to {temp.digest}, expected {digest}")
        upload, temp.upload = temp.upload, None
        if upload is not None:
            await upload.abort()           # not kept: nothing goes to the store
        await fileio.run(temp.close)
        weakref.finalize(owner, remove_later, temp.path)

    async def _persist(self, write: Awaitable[None], what: str) -> None:
        """An index write that must not fail the request: the in-memory maps serve
        until restart, when reconciliation drops files the index does not know."""
        try:
            await write
        except IndexUnavailable as exc:
            log.error("index write for %s failed: %s", what, exc)

    async def _place(self, temp: TempBlob, digest: str) -> None:
        """Verify, then commit to the store (a file renamed into place atomically, or an
        upload completed); a mismatch discards the temp file and any upload."""
        if temp.digest != digest:
            await temp.discard()
            raise DigestInvalid(f"content hashed to {temp.digest}, expected {digest}")
        await self.store.commit(temp, digest)

    async def put_manifest(self, upstream: str, repository: str, manifest: Manifest,
                           refs: References) -> None:
        """Store a verified manifest (its digest is the hash of its bytes) and link
        it, and everything it references, to the repository."""
        if manifest.digest not in self._manifests:
            temp = await self.new_temp(manifest.digest.split(":", 1)[0])
            try:
                await temp.write([manifest.data])
            except BaseException:
                await temp.discard()
                raise
            await self._place(temp, manifest.digest)
            await self._persist(self.index.add_manifest(manifest.digest, manifest.media_type,
                                                        manifest.size, refs),
                                f"manifest {manifest.digest}")
            self._set_manifest(manifest.digest, (manifest.media_type, manifest.size))
            self._remember(manifest.digest, manifest.data)
            self._grew()
        await self.link(upstream, repository, (manifest.digest, *refs.blobs, *refs.manifests))

    async def link(self, upstream: str, repository: str, digests: Iterable[str]) -> None:
        new = [d for d in digests if (upstream, repository, d) not in self._links]
        if new:
            await self._persist(self.index.link(upstream, repository, new),
                                f"links of {upstream}/{repository}")
            self._links.update((upstream, repository, d) for d in new)
            self._touch(links=((upstream, repository, d) for d in new))
            if upstream == HOSTED:
                self._host(set(new))

    async def unlink(self, upstream: str, repository: str, tags: Iterable[str] = (),
                     digests: Iterable[str] = ()) -> None:
        """Drop tags and links of one repository (the content itself stays)."""
        tags, digests = list(tags), [d for d in set(digests)
                                     if (upstream, repository, d) in self._links]
        await self.index.untag([(upstream, repository, t) for t in tags],
                               [(upstream, repository, d) for d in digests])
        for tag in tags:
            self._tags.pop((upstream, repository, tag), None)
        for digest in digests:
            self._links.discard((upstream, repository, digest))
            if upstream == HOSTED:
                self._unhost(digest)
        self._touch(tags=((upstream, repository, t) for t in tags),
                    links=((upstream, repository, d) for d in digests))

    async def refresh_links(self, upstream: str, repository: str, digests: Iterable[str],
                            create: bool = False) -> set[str]:
        """Stamp links with the time now (hosted gc's grace counts from it); which of
        ``digests`` are linked and present in the index (``Index.refresh_links``)."""
        wanted = list(digests)
        present = await self.index.refresh_links(upstream, repository, wanted, create)
        if create:
            new = {d for d in wanted if (upstream, repository, d) not in self._links}
            self._links.update((upstream, repository, d) for d in new)
            self._touch(links=((upstream, repository, d) for d in new))
            if upstream == HOSTED:
                self._host(new)                 # hosted_size counts them, as link() does
        return present

    async def add_referrer(self, upstream: str, repository: str, subject: str,
                           referrer: Referrer) -> None:
        await self._persist(self.index.add_referrer(upstream, repository, subject, referrer),
                            f"referrer {referrer.digest} of {subject}")

    def manifests_of(self, upstream: str) -> list[tuple[str, str]]:
        """(repository, digest) of every manifest linked under ``upstream``."""
        return sorted((r, d) for (_, r, d) in self._links.of(upstream)
                      if d in self._manifests)

    async def referrers_of(self, upstream: str, repository: str,
                           subject: str) -> list[Referrer]:
        return await self.index.referrers_of(upstream, repository, subject)

    async def referrer_list(self, upstream: str, repository: str,
                            subject: str) -> tuple[list[Referrer], float] | None:
        """A mirrored repository's cached referrers of ``subject`` and when they expire."""
        cached = await self.index.referrer_list(upstream, repository, subject)
        return None if cached is None else (referrers_of_index(cached[0]), cached[1])

    async def set_referrer_list(self, upstream: str, repository: str, subject: str,
                                found: list[Referrer], ttl: float) -> None:
        await self._persist(self.index.set_referrer_list(upstream, repository, subject,
                                                         referrers_index(found),
                                                         time.time() + ttl),
                            f"referrers of {upstream}/{repository}@{subject}")

    async def set_tag(self, upstream: str, repository: str, tag: str, digest: str,
                      ttl: float) -> None:
        now = time.time()
        row = TagRow(upstream, repository, tag, digest, now, now + ttl)
        await self._persist(self.index.set_tag(row), f"tag {upstream}/{repository}:{tag}")
        self._tags[(upstream, repository, tag)] = row
        self._touch(tags=[(upstream, repository, tag)])

    async def tag_list(self, upstream: str,
                       repository: str) -> tuple[list[str], float] | None:
        return await self.index.tag_list(upstream, repository)

    async def set_tag_list(self, upstream: str, repository: str, tags: list[str],
                           ttl: float) -> None:
        now = time.time()
        await self._persist(self.index.set_tag_list(upstream, repository, tags, now, now + ttl),
                            f"tag list of {upstream}/{repository}")

    async def repositories(self) -> list[tuple[str, str]]:
        return await self.index.repositories()
