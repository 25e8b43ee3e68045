"""Following a blob download another worker process runs (see fill_shared.py).

A ``ForeignFill`` is this process's view of it: one per digest (the proxy keeps it
with its own fills), any number of this process's readers, and a task that reads the
claim file's header every ``POLL`` seconds and moves ``written``, ``size`` and the
outcome the way a local ``Fill`` does, so readers (``FillReader``) cannot tell the
two apart: the last byte is held back until the owner committed the verified blob,
and a restart from byte 0 (new generation), a failure or the owner's death ends
their responses aborted. Once the blob is committed this process learns it from the
index, so the next request is a hit here too.
"""

from __future__ import annotations

import asyncio
import logging

from .cache import LocalCache
from .errors import CacheUnavailable
from .fill import GRACE, Download
from .fill_shared import ALIVE_EVERY, COMMITTED, DOWNLOADING, FAILED, PASSED, POLL, Claim

log = logging.getLogger("mirror.fill")


class ForeignFill(Download):
    def __init__(self, cache: LocalCache, digest: str, claim: Claim) -> None:
        super().__init__(cache, digest)
        self.claim = claim
        self._temp = ""
        self._known = asyncio.Event()       # the first header has been read

    def start(self) -> ForeignFill:
        self.task = asyncio.create_task(self._follow(), name=f"follow {self.digest}")
        return self

    async def _follow(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            check_alive = loop.time() + ALIVE_EVERY
            idle_since: float | None = None
            seen = None
            while True:
                header = self.claim.read()
                now = loop.time()
                if header is not None and header != seen:
                    seen = header
                    if header.generation != self.generation or not self._known.is_set():
                        self.generation = header.generation
                    self._temp, self.size = header.temp, header.size
                    self.written = header.written
                    self._known.set()
                    if header.state == PASSED:
                        self.uncached = True
                        return
                    if header.state == COMMITTED:
                        # The cache, not the header, says what was committed: a claim
                        # is also let go of as committed by a worker that found the
                        # blob cached already, having written no bytes at all.
                        size = (self.cache.blob_size(self.digest)
                                if await self.cache.learn_blob(self.digest) else None)
                        if size is None:
                            raise CacheUnavailable(f"blob {self.digest} is not in the cache "
                                                   "after another worker's download")
                        self.size = self.written = size
                        return
                    if header.state == FAILED:
                        raise CacheUnavailable(f"download of blob {self.digest} failed in "
                                               f"another worker (pid {header.pid})")
                    self._notify()
                if now >= check_alive:
                    check_alive = now + ALIVE_EVERY
                    if not self.claim.owner_alive():
                        last = self.claim.read()
                        if last is None or last.state == DOWNLOADING:
                            raise CacheUnavailable(
                                f"the worker downloading blob {self.digest} stopped; "
                                "retry to download it again")
                        continue             # it ended just now: the header says how
                if self.readers == 0:
                    idle_since = now if idle_since is None else idle_since
                    if now - idle_since > GRACE:
                        self.abandoned = True
                        return
                else:
                    idle_since = None
                await asyncio.sleep(POLL)
        except asyncio.CancelledError:
            self.error = CacheUnavailable(f"following the download of blob {self.digest} "
                                          "was cancelled (mirror stopping)")
            raise
        except CacheUnavailable as exc:
            log.warning("%s", exc.message)
            self.error = exc
        except OSError as exc:
            self.error = CacheUnavailable(f"cannot follow the download of blob {self.digest}: "
                                          f"{exc.strerror or exc}")
        finally:
            self.claim.close()
            self.done = True
            self._known.set()
            self._finished.set()
            self._notify()

    def _temp_path(self) -> str | None:
        return self._temp or None

    async def _open(self) -> tuple[int, int]:
        await self._known.wait()        # the owner's temp file is named in its header
        return await super()._open()
