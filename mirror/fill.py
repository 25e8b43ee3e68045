"""A blob being downloaded into the cache.

A ``Fill`` is one upstream download of a blob into a temp file, running as its
own task (detached from the request that started it). Any number of readers
follow the growing file. The last byte is held back until the whole blob is
verified, so a download that turns out wrong or short ends every reader's
response aborted, never complete-looking with bad bytes. (A range that ends
before the blob does has no such last byte: the API makes it wait for
``wait_verified``.)

Fills share their upstream's ``max_fills`` slots: a fill waiting for one has not
started, and its readers wait with it. Each reader holds a ``FillReader``; when
the last one lets go, the fill goes on for ``GRACE`` seconds (a client's retry
rejoins it) and is then cancelled unless it is ``FINISH_FROM`` of the way done
(finishing then costs less than what was fetched, and the next pull is a hit).
A ``detached`` fill (``mirror warm``) runs to the end with no reader at all.

Where the bytes come from: the upstream's ``pull`` endpoints (its mirrors, then the
source of truth; see upstream_group.py), best first. A download that breaks on one
(transport error, 5xx, 429), or stays below ``min_speed`` for ``SPEED_WINDOW``
seconds while another healthy endpoint exists, penalizes it and resumes on the next
with ``Range`` (a 404 or a denial moves on without penalty); the last endpoint left
is resumed ``RESUMES`` times with backoff, as a lone upstream always was. Wrong
bytes (the file does not hash to the digest, a body longer than announced, or sizes
that disagree) penalize the endpoints that wrote into the file, and the download
starts again from byte 0 on the next endpoint that did not: readers that were
following the discarded file end aborted (their client retries); readers joining
later follow the new download. Only when no endpoint is left does the fill fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from . import fileio, metrics
from .cache import LocalCache, TempBlob
from .errors import (
    CacheUnavailable,
    DigestInvalid,
    RegistryError,
    UpstreamBadContent,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from .fill_shared import COMMITTED, FAILED, PASSED, Claim
from .index import IndexUnavailable
from .notify import events
from .upstream_group import Endpoint, UpstreamGroup, error_reason

log = logging.getLogger("mirror.fill")

WRITE_BACKLOG = 4 * 1024 * 1024   # bytes received but not yet written before we wait
RECENT = 4 * 1024 * 1024          # bytes kept in memory behind the written end, for readers
RESUMES = 3                       # resumptions of a broken upstream stream per fill
RESUME_BACKOFF = 0.5              # seconds before the first resumption; doubles after
GRACE = 2.0                       # seconds an unread fill goes on before it is let go...
FINISH_FROM = 0.5                 # ...unless this share of the blob is in: then it finishes
SPEED_WINDOW = 5.0                # seconds under min_speed before a download moves on


SiteFetch = Callable[["Fill"], Awaitable[None]]   # _fetch under the site's lease
PEER_LABEL = "peer "              # source_label of bytes another replica streams (absorb)


class FillFailed(Exception):
    """Raised to readers when the download they follow failed after their headers went out."""


class _TooSlow(Exception):
    """A download stayed under ``min_speed`` for ``SPEED_WINDOW`` seconds."""


class _WrongBytes(Exception):
    """What is in the temp file cannot become the blob: start again from byte 0."""

    def __init__(self, message: str, blame_current: bool) -> None:
        super().__init__(message)
        self.message = message
        self.blame_current = blame_current      # the endpoint streaming now is at fault too


class Download:
    """What readers follow: a download of a blob into a growing file, run here
    (``Fill``) or by another worker process (``ForeignFill``). Subclasses say where the
    bytes are (``_open``) and move ``written``, ``size``, ``done``, ``error`` and
    ``generation``, calling ``_notify`` after each change."""

    source = "upstream"     # where a reader's bytes come from, for the metrics

    def __init__(self, cache: LocalCache, digest: str) -> None:
        self.cache = cache
        self.digest = digest
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self.done = False
        self.abandoned = False           # stopped because no one was reading it
        self.readers = 0
        self.generation = 0              # bumped when the download restarts from byte 0
        self.uncached = False            # too big for the cache's budget: streamed, not kept
        self._finished = asyncio.Event()
        self._progress = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def joinable(self) -> bool:
        return not self.done and not self.abandoned

    def reader(self) -> FillReader:
        return FillReader(self)

    async def wait_started(self) -> None:
        """Wait until the first bytes are in the cache file (or the fill ended), so a
        fill that fails at once (upstream error, full disk) is a clean error response
        rather than headers followed by an aborted body."""
        while not self.done and self.written == 0:
            await self._progress.wait()
        if self.error is not None and self.written == 0:
            raise self.error

    async def wait_verified(self) -> None:
        """Wait until the whole blob is verified and cached; raise why not."""
        await self._finished.wait()
        if self.error is not None:
            raise self.error

    def _hold(self) -> None:
        self.readers += 1

    def _let_go(self) -> None:
        self.readers -= 1

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    def _readable(self) -> int:
        """Bytes a reader may have now: all when verified, else all but the last."""
        if self.done and self.error is None:
            return self.written
        cap = self.written - 1 if self.size is None else min(self.written, self.size - 1)
        return max(0, cap)

    def _temp_path(self) -> str | None:
        """The file the download is writing (None before it has one)."""
        raise NotImplementedError

    async def _open(self) -> tuple[int, int]:
        """A descriptor on the blob's bytes, and the generation of the download it
        belongs to (a finished blob belongs to the current one). -1: the blob is
        committed to a store that is not files here (S3): read it from there."""
        path = self._temp_path()
        if not self.done and path:
            generation = self.generation
            try:
                return await fileio.open_read(path), generation
            except FileNotFoundError:
                pass     # committed (or discarded) in between: wait for the outcome
        await self._finished.wait()
        if self.error is not None:
            raise FillFailed(str(self.error))
        if not self.uncached and not self.cache.store.local_files:
            return -1, self.generation
        # Too big to cache: streamed through from its temp file; else the cached file.
        final = self._temp_path() if self.uncached else self.cache.path_for(self.digest)
        try:
            return await fileio.open_read(final or ""), self.generation
        except FileNotFoundError:
            raise FillFailed(f"blob {self.digest} is gone from the cache already") from None

    def _recent_at(self, pos: int, limit: int) -> bytes | None:
        """The bytes from ``pos`` (to the end of their chunk, at most to ``limit``) if
        they are still in memory (a download run here keeps its newest ones)."""
        return None

    async def chunks(self, start: int = 0,
                     end: int | None = None) -> AsyncGenerator[bytes | bytearray, None]:
        fd, generation = await self._open()
        if fd < 0:
            async for stored in self.cache.store.read(self.digest, start, end):
                yield stored
            return
        try:
            pos = start
            while True:
                if self.error is not None:
                    raise FillFailed(str(self.error))
                if self.generation != generation:
                    # The file this reader followed was thrown away (wrong bytes): what it
                    # sent may be wrong, so its response ends broken and the client retries.
                    raise FillFailed(f"download of blob {self.digest} started again from "
                                     "another source")
                target = end if end is not None else (self.written if self.done else None)
                if target is not None and pos >= target:
                    return
                limit = self._readable() if target is None else min(self._readable(), target)
                recent = self._recent_at(pos, limit) if pos < limit else None
                if recent is not None:
                    pos += len(recent)
                    yield recent
                    continue
                if pos < limit:
                    before = pos
                    async for chunk in fileio.read_range(fd, pos, limit):
                        pos += len(chunk)
                        yield chunk
                    if pos > before:
                        continue
                    if self.done and self.error is None and not self.uncached \
                            and not self.cache.store.local_files:
                        # The file ends short: the blob was committed from another
                        # replica's copy (Fill.adopt); the rest is in the store.
                        async for stored in self.cache.store.read(self.digest, pos, target):
                            yield stored
                        return
                if self.done:
                    raise FillFailed(f"range beyond the end of blob {self.digest}")
                await self._progress.wait()
        finally:
            os.close(fd)


class Fill(Download):
    def __init__(self, cache: LocalCache, upstream: UpstreamGroup, repository: str, digest: str,
                 slots: asyncio.Semaphore | None = None, detached: bool = False,
                 claim: Claim | None = None, site: SiteFetch | None = None) -> None:
        super().__init__(cache, digest)
        self.upstream = upstream
        self.site = site                 # a site of replicas: the fill lease (cluster/)
        self.repository = repository
        self.detached = detached         # runs to the end with no reader (mirror warm)
        self.claim = claim               # the claim file other workers follow (fill_shared)
        self._slots = slots              # the upstream's max_fills
        self._idle: asyncio.TimerHandle | None = None
        self._temp: TempBlob | None = None
        self.tee = True                  # the temp file's bytes go to the store as written
        self.adopted = False             # committed by another replica: none of ours kept
        self._began = False              # upstream has answered with a body once
        self._linked = False
        self.source_label: str | None = None      # the endpoint downloading (last) from
        self.sources: dict[str, int] = {}         # bytes of the kept file, per endpoint
        self._reserved = 0
        self._inflight: asyncio.Future[None] | None = None  # the task writing _pending
        self._pending: list[bytes] = []                       # received, not yet written
        self._pending_bytes = 0
        self._recent: deque[tuple[int, bytes]] = deque()    # (offset, chunk), newest last

    def start(self) -> Fill:
        self.task = asyncio.create_task(self._run(), name=f"fill {self.digest}")
        return self

    # -- readers coming and going ------------------------------------------------------------

    def _hold(self) -> None:
        self.readers += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _let_go(self) -> None:
        self.readers -= 1
        if self.readers == 0 and not self.done and not self.detached and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(GRACE, self._abandon_if_unread)

    def _abandon_if_unread(self) -> None:
        self._idle = None
        if self.readers or self.done or self.detached or self.task is None:
            return
        if self.size and self.written >= self.size * FINISH_FROM:
            log.info("blob %s: no client is reading it, but %d of %d bytes are in: "
                     "finishing it for the cache", self.digest, self.written, self.size)
            return
        self.abandoned = True
        log.info("blob %s: no client has read it for %gs; download stopped after %d of %s "
                 "bytes", self.digest, GRACE, self.written, self.size or "?")
        self.task.cancel()

    # -- the download ------------------------------------------------------------------------

    async def _run(self) -> None:
        slot: asyncio.Semaphore | None = None
        running = False
        try:
            if self.claim is not None and await self.cache.learn_blob(self.digest):
                # Another worker committed it after this one looked: nothing to fetch.
                self.size = self.written = self.cache.blob_size(self.digest) or 0
                return
            if self._slots is not None:
                metrics.fills_queued.inc()
                try:
                    await self._slots.acquire()      # a fill waiting here has not started
                finally:
                    metrics.fills_queued.dec()
                slot = self._slots
            metrics.fills_in_progress.inc()
            running = True
            self._temp = await self.cache.new_temp(self.digest.split(":", 1)[0],
                                                                       digest=self.digest)
            if self.claim is not None:
                self.claim.begin(self._temp.path, self.generation)
            await (self._fetch() if self.site is None else self.site(self))
            if self.adopted:
                log.info("blob %s (%s bytes) from %s/%s: committed by another replica of "
                         "the site; this one stored no copy of its own", self.digest,
                         self.size, self.upstream.name, self.repository)
                return
            self.size = self._temp.size
            if not self.uncached:
                events.fetched_blob(self.upstream.name, self.repository, self.digest, self.size)
            log.info("%s blob %s (%d bytes) from %s/%s via %s", "passed through (too big to "
                     "cache)" if self.uncached else "cached", self.digest, self.size,
                     self.upstream.name, self.repository,
                     ", ".join(f"{k} ({v} bytes)" for k, v in self.sources.items()))
        except BaseException as exc:
            self.error = _describe(exc, self.digest, self.abandoned)
            if isinstance(exc, RegistryError):
                log.warning("fill of %s failed: %s", self.digest, exc.message)
            elif isinstance(exc, OSError):
                log.error("fill of %s failed: cannot write the cache: %s", self.digest,
                          exc.strerror or exc)
            elif not isinstance(exc, asyncio.CancelledError):
                log.error("fill of %s failed", self.digest, exc_info=exc)
            await self._discard()
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            if running:
                metrics.fills_in_progress.dec()
            if slot is not None:
                slot.release()
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            self.cache.reserved -= self._reserved
            self._reserved = 0
            self._forget_recent()
            self.done = True
            if self.claim is not None:
                self.claim.finish(FAILED if self.error is not None else
                                  PASSED if self.uncached else COMMITTED)
            self._finished.set()
            self._notify()

    async def _fetch(self) -> None:
        """Download the blob into the temp file and commit it, walking the endpoints
        (see the module doc)."""
        assert self._temp is not None
        group = self.upstream
        out: list[Endpoint] = []            # not to be asked again by this fill
        contributors: list[Endpoint] = []   # wrote bytes into the current temp file
        resumes = 0
        last: RegistryError | None = None
        while True:
            candidates = [e for e in group.endpoints("pull") if e not in out]
            if not candidates:
                assert last is not None
                raise last
            endpoint, others = candidates[0], candidates[1:]
            try:
                try:
                    await self._download(endpoint, contributors,
                                         watch=any(e.healthy for e in others))
                    if self.size is not None and self._temp.size != self.size:
                        raise UpstreamUnavailable(
                            f"upstream {group.name}: blob {self.digest} ended after "
                            f"{self._temp.size} of {self.size} bytes")
                    await self._commit()
                except DigestInvalid as exc:
                    raise _WrongBytes(f"blob {exc.message}", blame_current=True) from None
                for e in contributors:
                    e.succeeded()
                return
            except _WrongBytes as exc:
                blame = [e for e in contributors if exc.blame_current or e is not endpoint]
                if exc.blame_current and endpoint not in blame:
                    blame.append(endpoint)
                for e in blame:
                    e.penalize("wrong bytes")
                    metrics.source_error(group.name, e.label, "bad_content")
                    out.append(e)
                last = UpstreamBadContent(f"upstream {group.name}"
                                          f"{f' ({_labels(blame)})' if blame else ''}: "
                                          f"{exc.message}")
                if not [e for e in group.endpoints("pull") if e not in out]:
                    raise last from None
                log.warning("blob %s: %s; starting again from byte 0 from another source",
                            self.digest, last.message)
                await self._restart()
                contributors, resumes = [], 0
            except _TooSlow:
                endpoint.penalize("too slow")
                metrics.source_error(group.name, endpoint.label, "slow")
                out.append(endpoint)
                log.warning("blob %s: %s is slower than min_speed (%d bytes/s); resuming "
                            "after %d bytes from another source", self.digest, endpoint.label,
                            group.config.min_speed, self._temp.size)
            except RegistryError as exc:
                last = exc
                transient = isinstance(exc, UpstreamUnavailable)
                if isinstance(exc, UpstreamUnavailable):
                    endpoint.penalize(exc.message)
                    metrics.source_error(group.name, endpoint.label, error_reason(exc))
                if others:
                    out.append(endpoint)
                    log.warning("blob %s: %s after %d bytes from %s; %s from another source",
                                self.digest, exc.message, self._temp.size, endpoint.label,
                                "resuming" if self._temp.size else "trying")
                    continue
                # The last source left: a stream that broke after it started is resumed
                # where it stopped; failing to start at all was already retried by the
                # upstream client.
                if (not transient or not self._began or resumes >= RESUMES
                        or isinstance(exc, (UpstreamRateLimited, UpstreamBadContent))):
                    raise
                resumes += 1
                log.warning("blob %s: %s after %d bytes; resuming (%d/%d)", self.digest,
                            exc.message, self._temp.size, resumes, RESUMES)
                await asyncio.sleep(RESUME_BACKOFF * 2 ** (resumes - 1))

    async def _commit(self) -> None:
        assert self._temp is not None
        if self.site is not None and not self.uncached and await self._committed_elsewhere():
            await self.adopt()      # another replica's download was committed first
            return
        # Committing moves the bytes from "reserved" to "cached": never count both.
        self.cache.reserved -= self._reserved
        self._reserved = 0
        await (self.cache.pass_through(self._temp, self.digest, self) if self.uncached
               else self.cache.commit_blob(self._temp, self.digest))

    async def _committed_elsewhere(self) -> bool:
        """Whether the site's shared store and index have the blob already (False on a
        store of files, which is this replica's own, or an index out of reach: then
        this fill commits its own copy, as it would on one machine)."""
        if self.cache.store.local_files:
            return False
        try:
            return await self.cache.learn_blob(self.digest)
        except (IndexUnavailable, CacheUnavailable) as exc:
            log.warning("blob %s: cannot tell whether another replica committed it "
                        "(%s); committing this replica's copy", self.digest, exc)
            return False

    async def adopt(self) -> None:
        """The blob is committed to the site's shared store already (another replica's
        download; ``cache.learn_blob`` found it): keep nothing of this fill's own, its
        readers read the committed object. Bytes it has in full must hash to the digest
        first (its readers had all but the last of them; else ``DigestInvalid``); a part
        is thrown away as by a restart (its readers end aborted and retry)."""
        assert self._temp is not None
        size = self.cache.blob_size(self.digest)
        if size is None:
            raise CacheUnavailable(f"blob {self.digest} is not in the cache")
        await self._flush()
        if self._temp.size == size and self._began:
            if self._temp.digest != self.digest:
                raise DigestInvalid(f"content hashed to {self._temp.digest}, expected "
                                    f"{self.digest}")
        elif self._temp.size:
            self.generation += 1          # and for the other workers following the claim:
            if self.claim is not None:
                self.claim.begin(self._temp.path, self.generation)
        self.cache.reserved -= self._reserved
        self._reserved = 0
        await self._discard()             # the temp file, and its upload (aborted)
        self.size = self.written = size   # no await from here: readers see it done next
        self.adopted = True

    async def drop_tee(self) -> None:
        """No bytes to the store from here: another replica is writing this blob to the
        shared store (its bytes come here through the peer channel). Should this fill
        have to commit them after all, the store gets them from the file then."""
        self.tee = False
        await self._flush()
        if self._temp is not None and self._temp.upload is not None:
            upload, self._temp.upload = self._temp.upload, None
            await asyncio.shield(upload.abort())

    async def _restart(self) -> None:
        """Start over from byte 0 in a fresh temp file; readers of the old one end
        aborted (they see ``generation`` change)."""
        inflight, self._inflight = self._inflight, None
        try:
            if inflight is not None:
                await fileio.finish(inflight)
        except Exception:
            pass                    # those bytes are being thrown away anyway
        self._pending, self._pending_bytes = [], 0
        self._forget_recent()
        old, self._temp = self._temp, await self.cache.new_temp(
            self.digest.split(":", 1)[0], digest=self.digest if self.tee else None)
        self.cache.reserved -= self._reserved
        self._reserved = 0
        self.generation += 1
        self.written = 0
        self.size = None
        self._began = False
        self.uncached = False
        self.sources = {}
        if self.claim is not None:
            self.claim.begin(self._temp.path, self.generation)
        self._notify()
        if old is not None:
            await old.discard()

    async def _download(self, endpoint: Endpoint, contributors: list[Endpoint],
                        watch: bool) -> None:
        """Append the endpoint's bytes from where the temp file ends to the end of the
        blob. ``watch``: another healthy endpoint exists, so one below ``min_speed``
        for ``SPEED_WINDOW`` seconds is abandoned (``_TooSlow``)."""
        assert self._temp is not None
        offset = self._temp.size
        group = self.upstream
        min_speed = group.config.min_speed if watch else 0
        received = offset
        began_at = time.monotonic()
        try:
            async with group.stream_blob(self.repository, self.digest, offset,
                                         endpoint=endpoint) as stream:
                self.source_label = endpoint.label
                group.note_source(endpoint)
                if self._began and stream.size is not None and self.size is not None \
                        and stream.size != self.size:
                    raise _WrongBytes(f"blob {self.digest} is {stream.size} bytes at "
                                      f"{endpoint.label} but {self.size} bytes where the "
                                      "download began", blame_current=False)
                if not self._began:
                    await self._begin(stream.size)
                skip = offset - stream.start        # upstream ignored Range: skip what we have
                quota = min_speed * SPEED_WINDOW
                deadline: float | None = None
                window = 0
                loop = asyncio.get_running_loop()
                chunks = stream.chunks().__aiter__()
                try:
                    while True:
                        try:
                            if deadline is None:
                                chunk = await anext(chunks)
                            else:
                                async with asyncio.timeout_at(deadline):
                                    chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                        except TimeoutError:
                            raise _TooSlow() from None
                        if min_speed:
                            # The window starts at the first bytes, and again each time
                            # it has brought min_speed's worth.
                            window += len(chunk)
                            if deadline is None or window >= quota:
                                deadline, window = loop.time() + SPEED_WINDOW, 0
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        received += len(chunk)
                        if endpoint not in contributors:
                            contributors.append(endpoint)
                        if self.size is not None and received > self.size:
                            raise _WrongBytes(f"blob {self.digest} is longer than announced",
                                              blame_current=True)
                        await self._take(received, chunk)
                except (UpstreamUnavailable, _TooSlow):
                    await self._flush()     # keep every byte that did arrive, then resume
                    raise
                await self._flush()
        finally:
            got = received - offset
            if got > 0:
                endpoint.measured(got, time.monotonic() - began_at)
                metrics.source_bytes(group.name, endpoint.label, got)
                self.sources[endpoint.label] = self.sources.get(endpoint.label, 0) + got

    async def _take(self, received: int, chunk: bytes) -> None:
        """Queue ``chunk`` (ending at byte ``received``) for the temp file. One writer at
        a time; what arrives meanwhile is gathered into its next write, so readers see
        bytes soon and writes stay big."""
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        self._remember(received - len(chunk), chunk)
        if self._inflight is not None and (
                self._inflight.done() or self._pending_bytes >= WRITE_BACKLOG):
            await self._settle()
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._write_pending())

    async def absorb(self, size: int, chunks: AsyncIterator[bytes], label: str) -> None:
        """Append the bytes another replica streams (from where the temp file ends) as
        ``_download`` does upstream's; verified at the commit like them. ``label``
        starts with ``PEER_LABEL``."""
        assert self._temp is not None
        if not self._began:
            await self._begin(size)
        elif size != self.size:
            raise UpstreamBadContent(f"blob {self.digest} is {size} bytes at {label} but "
                                     f"{self.size} where the download began")
        self.source_label = label
        received = offset = self._temp.size
        try:
            async for chunk in chunks:
                received += len(chunk)
                if received > size:
                    raise UpstreamBadContent(f"blob {self.digest} from {label} is longer "
                                             "than announced")
                await self._take(received, chunk)
        except asyncio.CancelledError:
            raise
        except BaseException:
            await self._flush()       # keep every byte that did arrive, then resume
            raise
        else:
            await self._flush()
        finally:
            if received > offset:
                self.sources[label] = self.sources.get(label, 0) + received - offset

    async def _begin(self, size: int | None) -> None:
        """The first answer with a body (again after a restart): size and space."""
        assert self._temp is not None
        self.size = size
        self._began = True
        if self.claim is not None:
            self.claim.sized(size)
        if not self._linked:
            self._linked = True
            # Upstream serves it in this repository: remember that for the next pull.
            await self.cache.link(self.upstream.name, self.repository, [self.digest])
        if self.size and not self.cache.fits(self.size):
            self.uncached = True        # reserves nothing, so evicts nothing
        elif self.size:
            self._reserved = self.size          # the evictor makes room ahead
            self.cache.reserved += self.size
            if self.cache.make_room is not None:
                await self.cache.make_room()
            # Claim the space up front: a full disk fails here, before the first
            # byte, and the file system lays the file out in one go (ext4 writes
            # it measurably faster).
            await fileio.preallocate(self._temp.fd, self.size)

    async def _write_pending(self) -> None:
        """Write what has arrived, batch after batch, until nothing is waiting: bytes
        received just before upstream stalls are on disk (and readable) during it."""
        assert self._temp is not None
        while self._pending:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
            await self._temp.write(batch)
            self._advance()

    async def _discard(self) -> None:
        """Drop the temp file once the write in flight is done: that write is never
        cancelled, since its thread would go on writing into the descriptor after
        the close, that is, into whichever file gets its number next."""
        inflight, self._inflight = self._inflight, None
        try:
            if inflight is not None:
                await fileio.finish(inflight)
        except Exception:
            pass                    # the fill has failed already; this is its cleanup
        finally:
            if self._temp is not None:
                await self._temp.discard()

    async def _flush(self) -> None:
        if self._inflight is not None:
            await self._settle()
        await self._write_pending()

    async def _settle(self) -> None:
        inflight, self._inflight = self._inflight, None
        if inflight is not None:
            await inflight

    def _advance(self) -> None:
        assert self._temp is not None
        if not (self.source_label or "").startswith(PEER_LABEL):   # not upstream's bytes
            metrics.fetched(self.upstream.name, self._temp.size - self.written)
        self.written = self._temp.size
        if self.claim is not None:
            self.claim.progress(self.written)
        self._drop_recent()
        self._notify()

    # -- the newest bytes, in memory ---------------------------------------------------------

    def _remember(self, offset: int, chunk: bytes) -> None:
        """Keep a chunk just received (bound for the temp file at ``offset``) for the
        readers close behind the download: they take it from here, from the moment it
        is written until ``RECENT`` bytes more are, instead of reading it back from
        the file (a copy into a fresh buffer: the costliest copy on these machines).
        What readers may have is still what ``_readable`` says."""
        self._recent.append((offset, chunk))

    def _drop_recent(self) -> None:
        """Let go of the chunks more than ``RECENT`` bytes behind the written end."""
        while self._recent:
            offset, chunk = self._recent[0]
            if offset + len(chunk) > self.written - RECENT:
                break
            self._recent.popleft()

    def _forget_recent(self) -> None:
        self._recent.clear()

    def _recent_at(self, pos: int, limit: int) -> bytes | None:
        for offset, chunk in reversed(self._recent):
            if offset <= pos:
                if pos >= offset + len(chunk):
                    return None
                end = min(len(chunk), limit - offset)
                start = pos - offset
                return chunk if (start, end) == (0, len(chunk)) else chunk[start:end]
        return None

    # -- readers -----------------------------------------------------------------------------

    def _temp_path(self) -> str | None:
        return str(self._temp.path) if self._temp is not None else None


class FillReader:
    """One client's hold on a fill, served as a ``BlobBody``: the fill counts its
    readers, and ``aclose`` lets go (idempotent)."""

    source = Download.source

    def __init__(self, fill: Download) -> None:
        self.fill = fill
        self.digest = fill.digest
        self._held = True
        fill._hold()

    @property
    def size(self) -> int | None:
        return self.fill.size

    async def wait_started(self) -> None:
        await self.fill.wait_started()

    async def wait_verified(self) -> None:
        await self.fill.wait_verified()

    def chunks(self, start: int = 0,
               end: int | None = None) -> AsyncGenerator[bytes | bytearray, None]:
        return self.fill.chunks(start, end)

    async def aclose(self) -> None:
        if self._held:
            self._held = False
            self.fill._let_go()


def _labels(endpoints: list[Endpoint]) -> str:
    return ", ".join(e.label for e in endpoints)


def _describe(exc: BaseException, digest: str, abandoned: bool = False) -> RegistryError:
    """The error a fill's readers get."""
    if isinstance(exc, RegistryError):
        return exc
    if isinstance(exc, OSError):
        return CacheUnavailable(f"the mirror could not store blob {digest}: "
                                f"{exc.strerror or exc}")
    if isinstance(exc, asyncio.CancelledError) and abandoned:
        return CacheUnavailable(f"download of blob {digest} was stopped: no client was "
                                "reading it")
    if isinstance(exc, asyncio.CancelledError):
        return CacheUnavailable(f"download of blob {digest} was cancelled (mirror stopping)")
    return CacheUnavailable(f"download of blob {digest} failed: {type(exc).__name__}")
