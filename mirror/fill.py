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
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator

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
from .upstream_group import UpstreamGroup

log = logging.getLogger("mirror.fill")

WRITE_BACKLOG = 4 * 1024 * 1024   # bytes received but not yet written before we wait
RESUMES = 3                       # resumptions of a broken upstream stream per fill
RESUME_BACKOFF = 0.5              # seconds before the first resumption; doubles after
GRACE = 2.0                       # seconds an unread fill goes on before it is let go...
FINISH_FROM = 0.5                 # ...unless this share of the blob is in: then it finishes


class FillFailed(Exception):
    """Raised to readers when the download they follow failed after their headers went out."""


class Fill:
    source = "upstream"     # where a reader's bytes come from, for the metrics

    def __init__(self, cache: LocalCache, upstream: UpstreamGroup, repository: str, digest: str,
                 slots: asyncio.Semaphore | None = None, detached: bool = False) -> None:
        self.cache = cache
        self.upstream = upstream
        self.repository = repository
        self.digest = digest
        self.size: int | None = None
        self.written = 0
        self.error: BaseException | None = None
        self.done = False
        self.detached = detached         # runs to the end with no reader (mirror warm)
        self.abandoned = False           # cancelled because no one was reading it
        self.readers = 0
        self._slots = slots              # the upstream's max_fills
        self._idle: asyncio.TimerHandle | None = None
        self._temp: TempBlob | None = None
        self._began = False              # upstream has answered with a body once
        self._reserved = 0
        self.uncached = False            # too big for the cache's budget: streamed, not kept
        self._finished = asyncio.Event()
        self._progress = asyncio.Event()
        self._inflight: asyncio.Future[None] | None = None  # the task writing _pending
        self._pending: list[bytes] = []                       # received, not yet written
        self._pending_bytes = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Fill:
        self.task = asyncio.create_task(self._run(), name=f"fill {self.digest}")
        return self

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
            if self._slots is not None:
                metrics.fills_queued.inc()
                try:
                    await self._slots.acquire()      # a fill waiting here has not started
                finally:
                    metrics.fills_queued.dec()
                slot = self._slots
            metrics.fills_in_progress.inc()
            running = True
            self._temp = await self.cache.new_temp(self.digest.split(":", 1)[0])
            resumes = 0
            while True:
                try:
                    await self._download()
                    break
                except UpstreamUnavailable as exc:
                    # A stream that broke after it started is resumed where it stopped;
                    # failing to start at all was already retried by the upstream client.
                    if (not self._began or resumes >= RESUMES
                            or isinstance(exc, (UpstreamRateLimited, UpstreamBadContent))):
                        raise
                    resumes += 1
                    log.warning("blob %s: %s after %d bytes; resuming (%d/%d)", self.digest,
                                exc.message, self._temp.size, resumes, RESUMES)
                    await asyncio.sleep(RESUME_BACKOFF * 2 ** (resumes - 1))
            if self.size is not None and self._temp.size != self.size:
                raise UpstreamUnavailable(f"upstream {self.upstream.name}: blob {self.digest} "
                                          f"ended after {self._temp.size} of {self.size} bytes")
            # Committing moves the bytes from "reserved" to "cached": never count both.
            self.cache.reserved -= self._reserved
            self._reserved = 0
            try:
                await (self.cache.pass_through(self._temp, self.digest, self) if self.uncached
                       else self.cache.commit_blob(self._temp, self.digest))
            except DigestInvalid as exc:
                raise UpstreamBadContent(
                    f"upstream {self.upstream.name}: blob {exc.message}") from None
            self.size = self._temp.size
            log.info("%s blob %s (%d bytes) from %s/%s", "passed through (too big to cache)"
                     if self.uncached else "cached", self.digest, self.size,
                     self.upstream.name, self.repository)
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
            self.done = True
            self._finished.set()
            self._notify()

    async def _download(self) -> None:
        """Append upstream's bytes from where the temp file ends to the end of the blob."""
        assert self._temp is not None
        offset = self._temp.size
        async with self.upstream.stream_blob(self.repository, self.digest, offset) as stream:
            if not self._began:
                self.size = stream.size
                self._began = True
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
            skip = offset - stream.start        # upstream ignored Range: skip what we have
            received = offset
            try:
                async for chunk in stream.chunks():
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    received += len(chunk)
                    if self.size is not None and received > self.size:
                        raise UpstreamBadContent(f"upstream {self.upstream.name}: blob "
                                                 f"{self.digest} is longer than announced")
                    self._pending.append(chunk)
                    self._pending_bytes += len(chunk)
                    # One writer at a time; what arrives meanwhile is gathered into its
                    # next write, so readers see bytes soon and writes stay big.
                    if self._inflight is not None and (self._inflight.done()
                                                       or self._pending_bytes >= WRITE_BACKLOG):
                        await self._settle()
                    if self._inflight is None:
                        self._inflight = asyncio.ensure_future(self._write_pending())
            except UpstreamUnavailable:
                await self._flush()     # keep every byte that did arrive, then resume
                raise
            await self._flush()

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
        metrics.fetched(self.upstream.name, self._temp.size - self.written)
        self.written = self._temp.size
        self._notify()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    # -- readers -----------------------------------------------------------------------------

    def _readable(self) -> int:
        """Bytes a reader may have now: all when verified, else all but the last."""
        if self.done and self.error is None:
            return self.written
        cap = self.written - 1 if self.size is None else min(self.written, self.size - 1)
        return max(0, cap)

    async def _open(self) -> int:
        if not self.done and self._temp is not None:
            try:
                return await fileio.open_read(self._temp.path)
            except FileNotFoundError:
                pass     # committed (or discarded) in between: wait for the outcome
        await self._finished.wait()
        if self.error is not None:
            raise FillFailed(str(self.error))
        if self.uncached:
            assert self._temp is not None       # streamed through from its temp file
            return await fileio.open_read(self._temp.path)
        return await fileio.open_read(self.cache.path_for(self.digest))

    async def chunks(self, start: int = 0,
                     end: int | None = None) -> AsyncGenerator[bytes | bytearray, None]:
        fd = await self._open()
        try:
            pos = start
            while True:
                if self.error is not None:
                    raise FillFailed(str(self.error))
                target = end if end is not None else (self.written if self.done else None)
                if target is not None and pos >= target:
                    return
                limit = self._readable() if target is None else min(self._readable(), target)
                if pos < limit:
                    async for chunk in fileio.read_range(fd, pos, limit):
                        pos += len(chunk)
                        yield chunk
                    continue
                if self.done:
                    raise FillFailed(f"range beyond the end of blob {self.digest}")
                await self._progress.wait()
        finally:
            os.close(fd)


class FillReader:
    """One client's hold on a fill, served as a ``BlobBody``: the fill counts its
    readers, and ``aclose`` lets go (idempotent)."""

    source = Fill.source

    def __init__(self, fill: Fill) -> None:
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
