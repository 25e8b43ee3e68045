"""One upstream download per blob for a whole site of replicas: the fill lease around
a ``Fill`` (fill.py) that won its replica's local claim (fill_shared.py).

``fetch(site, fill)`` is what such a fill runs instead of its plain upstream download:

- **Won the lease** (a new one, or one taken over after its owner stopped
  heartbeating): if the site's index and shared store have the blob already (another
  replica committed it after this one looked, or took over from a dead owner and
  finished), give the lease back and adopt it (``Fill.adopt``). Else download from
  upstream as always (resuming with ``Range`` from whatever the temp file holds
  already), heartbeating every ttl/3, and release the lease, committed or not, which
  wakes the replicas waiting on it.
- **Lost it**: this replica does not go upstream (but for one ``HEAD``: the client's
  repository must hold the blob upstream). It streams the owner's bytes from the
  owner's peer endpoint (peer_routes.py) into its own temp file, so its clients and
  its other workers follow them as they would an upstream download, and the last
  byte is held back until the file hashes to the digest (a mismatch starts again from
  byte 0). Those bytes are not written to the store (``Fill.drop_tee``): the owner
  committed the object by the time its stream ends, so this replica verifies what
  it served and adopts the committed object; only if the store lacks it (a store of
  files per replica) does it commit its own copy.
- **The peer stream breaks** (the owner died, or failed), or the owner's lease expires
  or passes to another replica while it streams (an owner that hangs breaks no
  connection; a watcher on the lease ends the stream): look at the lease every
  ``POLL`` seconds (``Leases.wait``) until it is released, expires or passes to
  another replica, trying to acquire it each time: the winner resumes from upstream
  where its file ends, the others stream from the new owner from where theirs end.
  An owner still holding its lease a ttl after its stream broke is alive, and is
  asked again; after ``PEER_TRIES`` broken streams in all, this replica downloads
  the blob from upstream itself (from byte 0, without the lease): a second download
  rather than a failed pull; so does a PostgreSQL out of reach when the lease is
  asked for. A lease held under this replica's own URL is a dead
  worker's (this process won the replica's claim): it is waited out, never streamed.

Manifests and tag revalidations take no lease: measured with bench/cluster_manifests.py
(3 replicas, 16 clients of a fresh tag), a cold tag costs one upstream GET per replica
that has not got it yet (3), a revalidation about one HEAD per replica (HEADs are free
of Docker Hub's pull limit), each a few KB in ~2 ms; a lease would add a PostgreSQL
round trip (~0.5 ms acquire, ~1 ms release, bench/fill_lease.py) to every miss and a
peer channel for manifests, to save at most replicas - 1 small GETs per new tag (none
once the index is shared: a replica that looks after the first stored it finds it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import httpx

from ..errors import DigestInvalid, UpstreamBadContent
from ..fill import PEER_LABEL
from .lease import Held, Lease, LeaseLost, Waited
from .peer_site import PEER_PREFIX, Site

if TYPE_CHECKING:
    from ..fill import Fill

log = logging.getLogger("mirror.cluster")

PEER_TRIES = 3          # broken peer streams before going upstream regardless
POLL = 0.2              # seconds between looks at a broken owner's lease
SIZE_HEADER = "Mirror-Blob-Size"


class PeerBroken(Exception):
    """The owner's stream ended early or could not be had."""


def fill_hook(site: Site) -> Callable[[Fill], Awaitable[None]]:
    """The ``site`` argument of ``Fill``: ``fetch`` bound to this replica's site."""
    async def hook(fill: Fill) -> None:
        await fetch(site, fill)
    return hook


async def fetch(site: Site, fill: Fill) -> None:
    digest = fill.digest
    authorized = False
    broken: str | None = None       # the owner whose stream broke last
    broken_at = 0.0
    breaks = 0
    while True:
        try:
            got = await site.leases.acquire(digest, site.owner, site.url, site.ttl)
        except Exception as exc:      # the database out of reach (asyncpg's errors, OSError)
            # Better a download per replica than none: the site's single flight is lost
            # while PostgreSQL is, the pull is not.
            log.warning("blob %s: the fill lease cannot be had (%s); downloading without "
                        "it", digest, type(exc).__name__)
            if fill._temp is not None and fill._temp.size:
                await fill._restart()
            await fill._fetch()
            return
        if isinstance(got, Lease):
            if not await _committed(fill, got, authorized):
                await _own(site, fill, got)
            return
        if got.peer_url == site.url:
            # A worker of this replica that died holding it: this process holds the
            # replica's claim now. Never stream from ourselves; wait for it to expire.
            await _wait(site, digest, site.ttl + POLL)
            continue
        if got.owner == broken and time.monotonic() < broken_at + site.ttl + POLL:
            # Dead, or alive? Its lease says so within a ttl: look again until it is
            # released, expires (then acquire) or passes to another replica.
            await _wait(site, digest, POLL)
            continue
        if not authorized:
            # Never fetched from upstream here: ask it whether the client's repository
            # holds the blob (raises BlobUnknown or the like if not).
            await fill.upstream.stat_blob(fill.repository, digest)
            authorized = True
        try:
            await _from_peer(site, fill, got)
            return
        except PeerBroken as exc:
            breaks += 1
            broken, broken_at = got.owner, time.monotonic()
            log.warning("blob %s: the stream from %s broke after %d bytes (%s); waiting "
                        "for its fill lease", digest, got.owner, fill.written, exc)
            if breaks >= PEER_TRIES:
                # The owner lives but cannot stream to us: better a second download
                # than a failed pull. From byte 0: what we have may be of mixed origin.
                log.warning("blob %s: the streams from the replicas downloading it broke "
                            "%d times; downloading it from upstream too", digest, breaks)
                await fill._restart()
                await fill._fetch()
                return


async def _wait(site: Site, digest: str, timeout: float) -> None:
    """Until the lease is released, expires or ``timeout`` passes; a database out of
    reach just sleeps (the next acquire finds out)."""
    try:
        await site.leases.wait(digest, timeout=timeout)
    except Exception as exc:
        log.debug("blob %s: waiting for the fill lease failed: %r", digest, exc)
        await asyncio.sleep(timeout)


async def _committed(fill: Fill, lease: Lease, authorized: bool) -> bool:
    """Whether the blob is in the site's store already (another replica committed it
    after this one looked, or took over from a dead owner and finished): then the
    lease goes back, and the fill adopts the committed object (after asking upstream,
    as a stream from a peer would, whether the client's repository holds it)."""
    if fill.cache.store.local_files:
        return False            # each replica's own files: nothing to share
    try:
        if not await fill.cache.learn_blob(fill.digest):
            return False
    except Exception as exc:     # the index out of reach: download under the lease
        log.debug("blob %s: cannot look it up in the index: %r", fill.digest, exc)
        return False
    with contextlib.suppress(Exception):                # else it expires
        await lease.release(True)
    if not authorized:
        await fill.upstream.stat_blob(fill.repository, fill.digest)
    await fill.cache.link(fill.upstream.name, fill.repository, [fill.digest])
    await fill.adopt()
    return True


async def _own(site: Site, fill: Fill, lease: Lease) -> None:
    """Download from upstream while holding the lease; release it however that ends."""
    def lost(exc: LeaseLost) -> None:
        # Another replica took it over (this one's heartbeat could not reach the
        # database for a whole ttl): both download now; each verifies its own bytes.
        log.warning("blob %s: %s; downloading on regardless", fill.digest, exc)

    log.debug("blob %s: this replica holds the fill lease", fill.digest)
    lease.keep_alive(lambda: fill.written, lambda: fill.size, on_lost=lost)
    committed = False
    try:
        await fill._fetch()
        committed = True
    finally:
        try:
            await asyncio.shield(lease.release(committed))
        except asyncio.CancelledError:
            raise
        except Exception as exc:      # the database out of reach: the lease expires
            log.warning("blob %s: could not release the fill lease: %r", fill.digest, exc)


async def _from_peer(site: Site, fill: Fill, held: Held) -> None:
    """The blob from the lease owner's peer endpoint, resumed from where the temp file
    ends, then verified and committed (or, the owner having committed it to the shared
    store, adopted: nothing more written); ``PeerBroken`` if the stream fails, or if the
    owner's lease expires or passes to another replica meanwhile (an owner that hangs
    breaks no connection: its lease says it is gone)."""
    assert fill._temp is not None
    label = f"{PEER_LABEL}{held.owner}"
    restarted = False
    await fill.drop_tee()              # the owner writes the object, not us
    while True:
        streaming = asyncio.ensure_future(_stream(site, fill, held, label))
        watching = asyncio.ensure_future(_gone(site, fill.digest, held))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            if not streaming.done():
                streaming.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
        if streaming.cancelled():
            await fill._flush()          # what did arrive stays; the rest from the next
            raise PeerBroken("its fill lease expired or passed to another replica")
        streaming.result()
        if fill.size is not None and fill._temp.size != fill.size:
            raise PeerBroken(f"ended after {fill._temp.size} of {fill.size} bytes")
        try:
            await fill._commit()
            return
        except DigestInvalid as exc:
            # What we have does not hash to the digest (bytes of a download the owner
            # threw away): once more from byte 0.
            if restarted:
                raise UpstreamBadContent(f"blob {exc.message} (from {label})") from None
            restarted = True
            log.warning("blob %s: %s from %s; starting again from byte 0", fill.digest,
                        exc.message, label)
            await fill._restart()


async def _stream(site: Site, fill: Fill, held: Held, label: str) -> None:
    """Append the peer's bytes from where the temp file ends."""
    assert fill._temp is not None
    path = f"{PEER_PREFIX}/blobs/{fill.digest}"
    offset = fill._temp.size
    headers = site.peer_headers("GET", path)
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        async with site.http.stream("GET", held.peer_url.rstrip("/") + path,
                                    headers=headers) as resp:
            if resp.status_code not in (200, 206):
                raise PeerBroken(f"HTTP {resp.status_code}")
            size = _size(resp)
            if resp.status_code == 200 and offset:
                raise PeerBroken("the peer ignored the range")
            log.info("blob %s: streaming it from %s from byte %d (this replica lost "
                     "the fill lease)", fill.digest, held.owner, offset)
            await fill.absorb(size, resp.aiter_raw(), label)
    except httpx.HTTPError as exc:
        raise PeerBroken(f"{type(exc).__name__}: {exc}") from None
    except UpstreamBadContent as exc:
        raise PeerBroken(exc.message) from None


async def _gone(site: Site, digest: str, held: Held) -> None:
    """Returns once ``held``'s lease expired or another replica holds it; never when
    it is released (the owner is done: its stream ends by itself)."""
    while True:
        try:
            waited = await site.leases.wait(digest, timeout=site.ttl / 2)
            if waited is Waited.EXPIRED:
                return
            if waited is Waited.RELEASED:
                await asyncio.Event().wait()
            holder = await site.leases.holder(digest)
        except asyncio.CancelledError:
            raise
        except Exception:                 # the database out of reach: trust the stream
            await asyncio.sleep(site.ttl / 2)
            continue
        if holder is not None and holder.owner != held.owner:
            return


def _size(resp: httpx.Response) -> int:
    with contextlib.suppress(KeyError, ValueError):
        size = int(resp.headers[SIZE_HEADER])
        if size >= 0:
            return size
    raise PeerBroken(f"no {SIZE_HEADER} header")
