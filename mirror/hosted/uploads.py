"""Blob upload sessions, kept in the data directory so they survive a restart.

Layout::

    data_dir/uploads/<uuid>/data        the bytes received so far
    data_dir/uploads/<uuid>/state.json  {"repository", "offset", "started", "touched"}

Every byte is hashed as it is written. A process that did not write the bytes so far
(after a restart, or another worker) re-hashes the data file before appending: hashlib
state cannot be persisted. One request at a time writes to a session, whichever worker
process it reaches (``lock``: a ``flock`` on ``uploads/<uuid>/lock``). The final ``PUT``
checks the digest and commits the file to the blob store through
``LocalCache.commit_blob`` (fsynced and renamed into ``blobs/``, or streamed into the
bucket and completed there, verified first either way); a blob already there (cached or
pushed before) is kept once and the upload is dropped. A request that fails part-way
(too big, client gone, wrong length) leaves the session as it was before it. Sessions no
request has written to for ``hosted.upload_ttl`` (abandoned) are gone: swept at
start-up, every quarter of the TTL while the server runs, by `mirror gc`, and when a
client touches one.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from .. import fileio, metrics
from ..cache import LocalCache, TempBlob
from ..config import HostedConfig
from ..errors import BlobUploadInvalid, BlobUploadUnknown, DigestInvalid, SizeInvalid
from ..models import HASHES, HOSTED
from ..notify import events

log = logging.getLogger("mirror.hosted")

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
BATCH = 1024 * 1024          # bytes gathered from the request before one write
LOCK_POLL = 0.01             # seconds between tries of a session another worker is writing


@dataclass
class Session:
    id: str
    repository: str
    offset: int
    started: float
    touched: float = 0.0        # when a request last wrote to it (0: not yet saved)

    def expired(self, ttl: float, now: float) -> bool:
        return max(self.started, self.touched) + ttl < now


class Uploads:
    def __init__(self, local: LocalCache, config: HostedConfig) -> None:
        self.local = local
        self.config = config
        self.root = local.data_dir / "uploads"
        self._locks: dict[str, asyncio.Lock] = {}
        self._open: dict[str, TempBlob] = {}    # sessions this process is writing

    async def open(self, sweep: bool = True) -> None:
        """Create the uploads folder and (``sweep``) drop sessions past ``upload_ttl``."""
        await fileio.run(self.root.mkdir, 0o755, False, True)
        if sweep:
            await self.sweep()

    async def sweep(self, dry_run: bool = False) -> int:
        """Drop the sessions untouched for longer than ``upload_ttl`` (and folders with no
        readable state as old); how many (``dry_run``: would go). A session a request of
        this process is writing right now is left to that request."""
        now = time.time()
        cutoff = now - self.config.upload_ttl
        try:
            entries = await fileio.run(os.listdir, self.root)
        except FileNotFoundError:
            return 0
        for gone in set(self._open) - set(entries):     # swept by `mirror gc`
            busy = self._locks.get(gone)
            if not dry_run and not (busy is not None and busy.locked()):
                await fileio.run(self._open.pop(gone).close)
                self._locks.pop(gone, None)
        dropped = 0
        for entry in entries:
            state = await self._state(entry)
            if state is not None:
                busy = self._locks.get(state.id)
                if (not state.expired(self.config.upload_ttl, now)
                        or (busy is not None and busy.locked())):
                    continue
            elif not await self._older(self.root / entry, cutoff):
                continue            # just created: its state is being written
            dropped += 1
            if dry_run:
                continue
            if state is not None:
                await self.cancel(state)
            else:
                await fileio.run(shutil.rmtree, self.root / entry, True)
        if dropped and not dry_run:
            log.info("dropped %d upload session%s untouched for hosted.upload_ttl (%gs)",
                     dropped, "" if dropped == 1 else "s", self.config.upload_ttl)
        return dropped

    async def schedule(self, interval: float) -> None:
        """Sweep every ``interval`` seconds while the server runs."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:         # a failed sweep must never take the server down
                log.exception("sweeping expired upload sessions failed")

    @staticmethod
    async def _older(path: Path, cutoff: float) -> bool:
        try:
            return (await fileio.run(os.stat, path)).st_mtime < cutoff
        except OSError:
            return False

    async def close(self) -> None:
        for temp in self._open.values():
            await fileio.run(temp.close)
        self._open.clear()

    # -- sessions

    async def start(self, repository: str) -> Session:
        session = Session(str(uuid.uuid4()), repository, 0, time.time())
        folder = self.root / session.id

        def create() -> None:
            folder.mkdir()
            (folder / "data").touch()
        await fileio.run(create)
        await self._save(session)
        return session

    async def get(self, repository: str, upload_id: str) -> Session:
        state = await self._state(upload_id) if UUID_RE.fullmatch(upload_id) else None
        if state is None or state.repository != repository:
            raise BlobUploadUnknown(f"no upload {upload_id[:64]!r} in {repository[:200]}")
        if state.expired(self.config.upload_ttl, time.time()):
            await self.cancel(state)
            raise BlobUploadUnknown(f"upload {upload_id} expired: untouched for longer "
                                    "than hosted.upload_ttl")
        return state

    @asynccontextmanager
    async def lock(self, session: Session) -> AsyncIterator[None]:
        """One request at a time writes to a session, in this process (an asyncio
        lock) and across the server's worker processes (a ``flock`` on its folder's
        ``lock`` file, polled without blocking so no thread waits on it)."""
        async with self._locks.setdefault(session.id, asyncio.Lock()):
            path = self.root / session.id / "lock"
            try:
                fd = await fileio.run(os.open, path, os.O_RDWR | os.O_CREAT
                                      | getattr(os, "O_CLOEXEC", 0), 0o644)
            except FileNotFoundError:
                raise BlobUploadUnknown(f"upload {session.id} is gone") from None
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(LOCK_POLL)
                yield
            finally:
                os.close(fd)            # drops the flock

    async def cancel(self, session: Session) -> None:
        temp = self._open.pop(session.id, None)
        if temp is not None:
            await fileio.run(temp.close)
        self._locks.pop(session.id, None)
        await fileio.run(shutil.rmtree, self.root / session.id, True)

    # -- bytes

    async def append(self, session: Session, body: AsyncIterator[bytes]) -> int:
        """Write the request body at the end of the session; the bytes written. On any
        failure the session is left as it was before the request."""
        temp = await self._writer(session)
        start = session.offset
        written = 0
        batch: list[bytes] = []
        pending = 0
        try:
            async for chunk in body:
                if not chunk:
                    continue
                if start + written + pending + len(chunk) > self.config.max_blob_size:
                    raise SizeInvalid(f"blob larger than hosted.max_blob_size "
                                      f"({self.config.max_blob_size} bytes)")
                batch.append(chunk)
                pending += len(chunk)
                if pending >= BATCH:
                    await temp.write(batch)
                    written += pending
                    batch, pending = [], 0
            if batch:
                await temp.write(batch)
                written += pending
        except BaseException:
            await self._rollback(session, start)
            raise
        session.offset = start + written
        await self._save(session)
        return written

    async def rollback(self, session: Session, offset: int) -> None:
        await self._rollback(session, offset)

    async def _rollback(self, session: Session, offset: int) -> None:
        temp = self._open.pop(session.id, None)
        if temp is not None:
            await fileio.run_to_end(temp.close)
        path = self.root / session.id / "data"
        await fileio.run_to_end(os.truncate, path, offset)
        session.offset = offset
        await self._save(session)

    async def finish(self, session: Session, digest: str) -> int:
        """Verify the bytes against ``digest`` and make them the blob, linked to the
        session's repository; the session is gone afterwards, whatever happens."""
        algorithm = digest.split(":", 1)[0]
        temp = await self._writer(session, algorithm)
        # Held until linked: committed but not yet linked, the blob would look like
        # unreferenced cached content to an eviction run in between.
        self.local.hold(digest)
        try:
            if temp.digest != digest:
                raise DigestInvalid(f"uploaded content hashed to {temp.digest}, not {digest}",
                                    detail={"digest": digest})
            # Link (stamped now, for hosted gc's grace) before looking whether the blob
            # is there: a gc sweep then either removed it already, and it is written
            # again, or sees the fresh link and keeps it (Index.refresh_links).
            if not await self.local.refresh_links(HOSTED, session.repository, [digest],
                                                  create=True) \
                    or self.local.blob_size(digest) is None:
                self._open.pop(session.id, None)
                await self.local.commit_blob(temp, digest)
            size = temp.size
            await self.local.link(HOSTED, session.repository, [digest])
        finally:
            self.local.release(digest)
            await self.cancel(session)
        metrics.pushed("blob")
        events.pushed_blob(session.repository, digest, size)
        return size

    async def _writer(self, session: Session, algorithm: str = "sha256") -> TempBlob:
        """The session's data file open for appending, hashed up to its offset."""
        temp = self._open.get(session.id)
        if temp is not None and temp.size == session.offset and \
                temp.digest.startswith(algorithm + ":"):
            return temp
        if temp is not None:
            self._open.pop(session.id, None)
            await fileio.run(temp.close)
        path = self.root / session.id / "data"

        def reopen() -> TempBlob:
            fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
            try:
                os.ftruncate(fd, session.offset)      # bytes past the recorded offset
                new = TempBlob(path, fd, algorithm)
                hasher = HASHES[algorithm]()
                pos = 0
                while pos < session.offset:
                    data = os.pread(fd, min(BATCH, session.offset - pos), pos)
                    if not data:
                        break
                    hasher.update(data)
                    pos += len(data)
                os.lseek(fd, pos, os.SEEK_SET)
            except BaseException:
                os.close(fd)
                raise
            new._hasher = hasher
            new.size = pos
            return new
        try:
            temp = await fileio.run(reopen)
        except FileNotFoundError:
            raise BlobUploadUnknown(f"upload {session.id} is gone") from None
        if temp.size != session.offset:
            await fileio.run(temp.close)
            raise BlobUploadInvalid(f"upload {session.id} lost bytes; start again")
        self._open[session.id] = temp
        return temp

    # -- state files

    async def _save(self, session: Session) -> None:
        folder = self.root / session.id
        session.touched = time.time()
        text = json.dumps({"repository": session.repository, "offset": session.offset,
                           "started": session.started, "touched": session.touched})

        def write() -> None:
            tmp = folder / "state.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, folder / "state.json")
        try:
            await fileio.run_to_end(write)
        except FileNotFoundError:
            raise BlobUploadUnknown(f"upload {session.id} is gone") from None

    async def _state(self, upload_id: str) -> Session | None:
        path: Path = self.root / upload_id / "state.json"
        try:
            raw = json.loads(await fileio.run(path.read_text))
            return Session(upload_id, str(raw["repository"]), int(raw["offset"]),
                           float(raw["started"]), float(raw.get("touched", 0.0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None
