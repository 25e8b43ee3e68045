"""ProxyStore: the cache first, the upstream on a miss, and the cache filled from it.

- By digest: immutable. Served from the cache when this repository is known to
  hold it (linked); content cached for another repository is served after one
  upstream HEAD confirms this repository has it too (so a digest is no key to
  content from a repository one could not pull).
- By tag: a pointer with a TTL. Inside it, no upstream call. After it, a HEAD
  revalidates and a GET happens only when the digest changed. Upstream
  unavailable while a copy is cached: the copy is served (stale) and counted.
  Revalidation is asked with ``fallback=True``: upstream gives it only
  ``revalidate_timeout``, and none at all while it is known to be down.
- One upstream request per (repository, reference, Accept) for manifests and one
  fill per blob digest, however many clients ask at once; at most ``max_fills``
  fills download at once (the rest wait for a slot), and a fill no client reads
  any more is let go (see fill.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import fill_shared, metrics
from .cache import LocalCache
from .errors import BlobUnknown, Denied, ManifestUnknown, NameUnknown, UpstreamUnavailable
from .fill import Download, Fill, FillReader, SiteFetch
from .fill_follow import ForeignFill
from .index import IndexUnavailable
from .models import (
    INDEX_TYPES,
    SCHEMA1_TYPES,
    Manifest,
    ManifestInfo,
    Referrer,
    acceptable,
    accepted_types,
    is_digest,
    require_acceptable,
    upstream_accept,
)
from .notify import events
from .storage import StoredBlob
from .upstream_group import UpstreamGroup

log = logging.getLogger("mirror.proxy")

T = TypeVar("T")
NOT_THERE = (BlobUnknown, ManifestUnknown, NameUnknown, Denied)


class SingleFlight:
    """Concurrent calls with the same key share one execution and its result."""

    def __init__(self) -> None:
        self._calls: dict[object, asyncio.Future[Any]] = {}

    async def do(self, key: object, fn: Callable[[], Awaitable[T]]) -> T:
        fut = self._calls.get(key)
        if fut is None:
            fut = asyncio.ensure_future(fn())
            self._calls[key] = fut
            fut.add_done_callback(lambda f: self._calls.pop(key, None) if self._calls.get(key) is f
                                  else None)
        # shield: one waiter going away must not cancel the shared call
        return await asyncio.shield(fut)

    def running(self, key: object) -> bool:
        return key in self._calls


class ProxyStore:
    def __init__(self, local: LocalCache, remote: UpstreamGroup, tag_ttl: float,
                 offline: bool = False) -> None:
        self.local = local
        self.remote = remote
        self.name = remote.name
        self.tag_ttl = tag_ttl
        self.offline = offline      # never contact upstream: serve what is cached, as it is
        self._flights = SingleFlight()
        self._fills: dict[str, Download] = {}   # running here, or followed (another worker's)
        self._fill_slots = asyncio.Semaphore(remote.config.max_fills)
        self.site: SiteFetch | None = None       # a site of replicas' fill lease (app.py)

    async def aclose(self) -> None:
        for fill in list(self._fills.values()):
            if fill.task:
                fill.task.cancel()
        await asyncio.gather(*(f.task for f in self._fills.values() if f.task),
                             return_exceptions=True)
        await self.remote.aclose()

    # -- manifests -----------------------------------------------------------------------

    async def _offline_retry(self, call: Callable[[], Awaitable[T]]) -> T:
        """Offline, a miss may be content `mirror import` just added beside us: look
        again once the maps are reloaded, rather than a second or two later."""
        try:
            return await call()
        except (ManifestUnknown, BlobUnknown):
            if not self.offline or not await self.local.changed_elsewhere():
                raise
        return await call()

    async def get_manifest(self, repository: str, reference: str, accept: list[str]) -> Manifest:
        manifest = await self._offline_retry(
            lambda: self._get_manifest(repository, reference, accept))
        if not is_digest(reference):
            self.local.count_pull(self.name, repository, reference)   # for `mirror stats`
        return manifest

    async def _get_manifest(self, repository: str, reference: str,
                            accept: list[str]) -> Manifest:
        accepted = accepted_types(accept)        # what this client takes
        ask = upstream_accept(accept)            # what upstream is asked for
        if is_digest(reference):
            manifest = await self._cached_by_digest(repository, reference)
            if manifest is not None:
                metrics.lookup("manifest", "hit")
                return manifest
            return await self._fetch(repository, reference, ask)
        row = self.local.tag(self.name, repository, reference)
        cached = await self.local.read_manifest(row.digest) if row else None
        if cached is not None and not acceptable(cached.media_type, accepted):
            # The client asked for another form than the one the tag is cached as:
            # pass its Accept upstream; do not repoint the tag at that form. Offline,
            # the cached form is all there is (as for a hosted manifest).
            if self.offline:
                require_acceptable(cached.media_type, accept, f"{repository}:{reference}")
            return await self._fetch(repository, reference, ask, update_tag=False)
        if cached is not None and row is not None:
            if row.expires_at > time.time() or self.offline:
                metrics.lookup("manifest", "hit")
                return cached
            try:
                info = await self._flights.do(
                    ("head", repository, reference, tuple(ask)),
                    lambda: self.remote.head_manifest(repository, reference, ask, fallback=True))
            except UpstreamUnavailable as exc:
                return self._stale(cached, repository, reference, exc)
            if info is not None and info.digest == row.digest:
                await self.local.set_tag(self.name, repository, reference, row.digest, self.tag_ttl)
                metrics.lookup("manifest", "hit")          # revalidated: still the same
                return cached
        try:
            return await self._fetch(repository, reference, ask,
                                     update_tag=_full_accept(accepted_types(ask)),
                                     fallback=cached is not None)
        except UpstreamUnavailable as exc:
            if cached is not None:
                return self._stale(cached, repository, reference, exc)
            raise

    async def head_manifest(self, repository: str, reference: str,
                            accept: list[str]) -> ManifestInfo:
        """containerd resolves a tag with HEAD and then GETs by digest: a HEAD by tag
        counts as a pull as a GET by tag does."""
        info = await self._offline_retry(
            lambda: self._head_manifest(repository, reference, accept))
        if not is_digest(reference):
            self.local.count_pull(self.name, repository, reference)
        return info

    async def _head_manifest(self, repository: str, reference: str,
                             accept: list[str]) -> ManifestInfo:
        if is_digest(reference):
            info = self.local.manifest_info(reference)
            if info is not None:
                # Cached (maybe for another repository): one upstream HEAD at most decides.
                if not await self._authorized(repository, reference, blob=False):
                    raise ManifestUnknown(f"manifest {reference} is not known in {repository}")
                metrics.lookup("manifest", "hit")
                return info
        else:
            row = self.local.tag(self.name, repository, reference)
            info = self.local.manifest_info(row.digest) if row else None
            if (row is not None and info is not None
                    and (row.expires_at > time.time() or self.offline)
                    and acceptable(info.media_type, accepted_types(accept))):
                metrics.lookup("manifest", "hit")
                return info
        # Revalidation and misses both go through GET's logic (HEAD upstream first
        # when a copy is cached), so HEAD and GET always agree.
        manifest = await self._get_manifest(repository, reference, accept)
        return ManifestInfo(manifest.digest, manifest.media_type, manifest.size)

    async def _cached_by_digest(self, repository: str, digest: str) -> Manifest | None:
        if self.local.manifest_info(digest) is None:
            return None
        if not await self._authorized(repository, digest, blob=False):
            raise ManifestUnknown(f"manifest {digest} is not known in {repository}")
        return await self.local.read_manifest(digest)

    async def _fetch(self, repository: str, reference: str, accept: list[str],
                     update_tag: bool = True, fallback: bool = False) -> Manifest:
        """``fallback``: a cached copy stands in if upstream fails (see Upstream)."""
        if self.offline:
            raise ManifestUnknown(f"{repository}{'@' if is_digest(reference) else ':'}{reference} "
                                  f"is not in the cache, and upstream {self.name} is offline")

        async def fetch() -> Manifest:
            manifest, refs = await self.remote.get_manifest(repository, reference, accept,
                                                            fallback=fallback)
            if manifest.media_type in SCHEMA1_TYPES:
                # Legacy, and re-signed by upstream on every GET: passed through, not kept.
                return manifest
            try:
                await self.local.put_manifest(self.name, repository, manifest, refs)
                if update_tag and not is_digest(reference):
                    await self.local.set_tag(self.name, repository, reference, manifest.digest,
                                             self.tag_ttl)
                events.fetched(self.name, repository, manifest.digest, manifest.media_type,
                               manifest.size)
            except (OSError, IndexUnavailable) as exc:
                # The client still gets the verified manifest; only caching failed.
                log.error("could not cache manifest %s of %s/%s: %s", manifest.digest,
                          self.name, repository, exc)
            return manifest
        key = ("get", repository, reference, tuple(accept), update_tag)
        metrics.lookup("manifest", "coalesced" if self._flights.running(key) else "miss")
        return await self._flights.do(key, fetch)

    def _stale(self, cached: Manifest, repository: str, reference: str,
               exc: UpstreamUnavailable) -> Manifest:
        metrics.stale(self.name)
        metrics.lookup("manifest", "stale")
        events.stale(self.name, repository, cached.digest, cached.media_type, cached.size,
                     "" if is_digest(reference) else reference)
        log.warning("serving stale %s/%s:%s (%s): %s", self.name, repository, reference,
                    cached.digest, exc.message)
        return cached

    # -- blobs ---------------------------------------------------------------------------

    async def open_blob(self, repository: str, digest: str) -> StoredBlob | FillReader:
        """The cached blob, or a reader of its download (which the caller waits on
        with ``wait_started``; the fill starts or joins here)."""
        return await self._offline_retry(lambda: self._open_blob(repository, digest))

    async def _open_blob(self, repository: str, digest: str,
                         learned: bool = False) -> StoredBlob | FillReader:
        size = self.local.blob_size(digest)
        fill = self._fills.get(digest)
        if size is not None or (fill is not None and fill.joinable):
            if not await self._authorized(repository, digest, blob=True):
                raise BlobUnknown(f"blob {digest} is not known in {repository}")
            if size is not None and (cached := await self.local.open_blob(digest)) is not None:
                metrics.lookup("blob", "hit")
                return cached
            fill = self._fills.get(digest)
            if fill is not None and fill.joinable:
                metrics.lookup("blob", "coalesced")
                return fill.reader()                # join the download in progress
            # Evicted (or removed by `mirror gc`) since we looked: fetch it again.
        if self.offline:
            raise self._offline_blob(digest)
        # One download per blob for the whole server: another worker process may have
        # cached it, or be downloading it (then this one follows; fill_shared.py).
        if not learned and await self.local.learn_blob(digest):
            return await self._open_blob(repository, digest, learned=True)
        if (fill := self._fills.get(digest)) is not None and fill.joinable:
            metrics.lookup("blob", "coalesced")      # one of ours started meanwhile
            return fill.reader()
        # No await from here until the fill is in _fills: this process's other requests
        # for the blob join it rather than claim it again. (Claiming is a few small
        # syscalls on a file in tmp/.)
        claim = fill_shared.claim(self.local.data_dir, digest)
        if claim.owner:
            metrics.lookup("blob", "miss")
            fill = Fill(self.local, self.remote, repository, digest, self._fill_slots,
                        claim=claim, site=self.site)
        else:
            metrics.lookup("blob", "coalesced")
            fill = ForeignFill(self.local, digest, claim)
        reader = fill.reader()
        task = fill.start().task
        assert task is not None
        self._fills[digest] = fill
        task.add_done_callback(
            lambda _: self._fills.pop(digest, None) if self._fills.get(digest) is fill else None)
        if not claim.owner and not await self._authorized(repository, digest, blob=True):
            await reader.aclose()
            raise BlobUnknown(f"blob {digest} is not known in {repository}")
        return reader

    async def stat_blob(self, repository: str, digest: str) -> int:
        return await self._offline_retry(lambda: self._stat_blob(repository, digest))

    async def _stat_blob(self, repository: str, digest: str) -> int:
        size = self.local.blob_size(digest)
        if size is not None and await self._authorized(repository, digest, blob=True):
            return size
        fill = self._fills.get(digest)
        if (fill is not None and fill.size is not None
                and self.local.linked(self.name, repository, digest)):
            return fill.size
        if self.offline:
            raise self._offline_blob(digest)
        return await self.remote.stat_blob(repository, digest)

    def _offline_blob(self, digest: str) -> BlobUnknown:
        return BlobUnknown(f"blob {digest} is not in the cache, and upstream {self.name} "
                           "is offline")

    async def _authorized(self, repository: str, digest: str, blob: bool) -> bool:
        """Whether this repository may be served cached content ``digest``."""
        if self.local.linked(self.name, repository, digest):
            return True
        if await self.local.learn_link(self.name, repository, digest):
            return True
        if self.offline:
            return False
        try:
            if blob:
                await self.remote.stat_blob(repository, digest)
            else:
                await self.remote.head_manifest(repository, digest, [])
        except NOT_THERE:
            return False
        await self.local.link(self.name, repository, [digest])
        return True

    # -- referrers -----------------------------------------------------------------------

    async def referrers(self, repository: str, subject: str) -> list[Referrer]:
        """Upstream's referrers of ``subject``, cached for the tag TTL; stale (or, never
        fetched, none) while the upstream is offline; stale (or, never fetched, the error)
        while it is unavailable or denies access. A denial is never cached: it says
        nothing about what refers to ``subject``."""
        cached = await self.local.referrer_list(self.name, repository, subject)
        if cached is not None and (cached[1] > time.time() or self.offline):
            return cached[0]
        if self.offline:
            return []
        try:
            found = await self._flights.do(
                ("referrers", repository, subject),
                lambda: self.remote.referrers(repository, subject, fallback=cached is not None))
        except (UpstreamUnavailable, Denied) as exc:
            if cached is None:
                raise
            metrics.stale(self.name)
            log.warning("serving stale referrers of %s/%s@%s: %s", self.name, repository,
                        subject, exc.message)
            return cached[0]
        except NOT_THERE:
            found = []
        await self.local.set_referrer_list(self.name, repository, subject, found, self.tag_ttl)
        return found

    # -- tags ----------------------------------------------------------------------------

    async def tags(self, repository: str) -> list[str]:
        cached = await self.local.tag_list(self.name, repository)
        if cached is not None and (cached[1] > time.time() or self.offline):
            return cached[0]
        if self.offline:
            known = self.local.tags_of(self.name, repository)
            if not known:
                raise NameUnknown(f"no tags of {repository} are cached, and upstream "
                                  f"{self.name} is offline")
            return known
        fallback = cached is not None or bool(self.local.tags_of(self.name, repository))
        try:
            tags = await self._flights.do(("tags", repository),
                                          lambda: self.remote.tags(repository, fallback=fallback))
        except UpstreamUnavailable as exc:
            known = cached[0] if cached is not None else self.local.tags_of(self.name, repository)
            if not known:
                raise
            metrics.stale(self.name)
            log.warning("serving stale tag list of %s/%s: %s", self.name, repository, exc.message)
            return known
        await self.local.set_tag_list(self.name, repository, tags, self.tag_ttl)
        return tags


def _full_accept(asked: list[str]) -> bool:
    """Whether what upstream was asked for lets it answer with the tag's own manifest
    (an index included): only then may the answer repoint the cached tag."""
    return any(t in INDEX_TYPES for t in asked)
