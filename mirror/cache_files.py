"""The cache's files: blobs being written, blobs being read, and the disk calls
that make them durable.

``TempBlob`` is a file under ``data_dir/tmp`` hashed as it is written (on a worker
thread), whatever the blob store: with one that is not the file system (S3) it also
feeds the store's ``upload`` (the tee) with the same bytes as they arrive, hashed once
here; ``CachedBlob`` is a cached blob opened for a response, held against eviction
until it is closed. ``fdatasync``, ``fsync_dir`` and ``make_dirs`` are what
``LocalCache`` uses to put a verified file in place so that a power loss never leaves
the index naming wrong bytes; ``scan_blobs`` is the file side of start-up
reconciliation. Nothing here touches the index (``cache`` does).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import fileio
from .errors import CacheUnavailable, DigestInvalid
from .models import DIGEST_RE, HASHES

if TYPE_CHECKING:
    from .storage import Upload


class Holds(Protocol):
    """What keeps an opened blob from eviction (``LocalCache``)."""

    def release(self, digest: str) -> None: ...


class TempBlob:
    """A file being written under data_dir/tmp, hashed as it is written; ``upload``
    (the blob store's tee, if it has one) gets the same bytes."""

    def __init__(self, path: Path, fd: int, algorithm: str,
                 upload: Upload | None = None) -> None:
        self.path = path
        self.fd = fd
        self.size = 0
        self.upload = upload
        self._hasher = HASHES[algorithm]()
        self._algorithm = algorithm
        self.closed = False
        self._busy: asyncio.Future[None] | None = None   # the last write's thread

    async def write(self, chunks: list[bytes]) -> None:
        """Hash and append ``chunks``, both on a worker thread: hashlib lets go of the
        GIL for big buffers, so the event loop keeps receiving meanwhile. A cancelled
        write returns only once its thread is done with the descriptor."""
        def hash_and_write() -> None:
            for chunk in chunks:
                self._hasher.update(chunk)
            fileio.writev_all(self.fd, chunks)
        self._busy = asyncio.get_running_loop().run_in_executor(None, hash_and_write)
        try:
            if self.upload is not None:     # meanwhile, the same bytes to the store
                for chunk in chunks:
                    await self.upload.write(chunk)
        finally:
            await fileio.finish(self._busy)
        self.size += sum(len(c) for c in chunks)

    @property
    def digest(self) -> str:
        return f"{self._algorithm}:{self._hasher.hexdigest()}"

    def fsync(self) -> None:
        """Put the bytes written so far on disk (blocks: call it on a worker thread)."""
        fdatasync(self.fd)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)

    async def discard(self) -> None:
        """Close and delete the file, never while a write's thread still uses the
        descriptor (its bytes would land in the next file to get the number)."""
        def rm() -> None:
            self.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        try:
            if self._busy is not None:
                await fileio.finish(self._busy)
        except Exception:
            pass                # that write's error was reported to whoever awaited it
        finally:
            await fileio.run_to_end(rm)
            upload, self.upload = self.upload, None
            if upload is not None:
                await asyncio.shield(upload.abort())


def blob_path(data_dir: Path, digest: str) -> Path:
    """Where the cache keeps a verified blob or manifest: ``blobs/<alg>/<2 hex>/<hex>``."""
    if not DIGEST_RE.fullmatch(digest):          # defence in depth: callers validated
        raise DigestInvalid(f"invalid digest {digest[:200]!r}")
    algorithm, hexpart = digest.split(":", 1)
    return Path(data_dir) / "blobs" / algorithm / hexpart[:2] / hexpart


def fdatasync(fd: int) -> None:
    """Put a file's bytes (and the size it needs to read them back) on disk; blocks."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def fsync_dir(path: Path) -> None:
    """Put a directory's entries (a rename into it, a new subdirectory) on disk; blocks."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_later(path: Path) -> None:
    """Unlink ``path`` off the event loop when one runs (a big file takes a while)."""
    def unlink() -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    try:
        asyncio.get_running_loop().run_in_executor(None, unlink)
    except RuntimeError:          # no loop (interpreter exit): now
        unlink()


def make_dirs(path: Path) -> list[Path]:
    """mkdir -p ``path``; the directories it created, deepest first."""
    made: list[Path] = []
    missing = path
    while not missing.is_dir():
        made.append(missing)
        missing = missing.parent
    for directory in reversed(made):
        try:
            directory.mkdir()
        except FileExistsError:
            pass
    return made


class CachedBlob:
    """A blob in the cache, opened: the open file keeps its bytes readable even if the
    blob is evicted meanwhile, and the hold keeps the evictor away while it is served."""

    source = "cache"

    def __init__(self, cache: Holds, fd: int, digest: str, size: int) -> None:
        self._cache = cache
        self._fd: int | None = fd
        self.digest = digest
        self.size = size

    async def wait_started(self) -> None:
        """Cached: nothing to wait for."""

    async def wait_verified(self) -> None:
        """Cached blobs were verified before they were placed."""

    def fileno(self) -> int:
        """The open file, for a zero-copy send (api.py); it stays open, and the blob
        held, until ``aclose``."""
        if self._fd is None:
            raise CacheUnavailable(f"cached blob {self.digest} was already let go of")
        return self._fd

    async def chunks(self, start: int = 0,
                     end: int | None = None) -> AsyncGenerator[bytes | bytearray, None]:
        end = self.size if end is None else end
        fd = self._fd
        if fd is None:
            raise CacheUnavailable(f"cached blob {self.digest} was already let go of")
        try:
            pos = start
            async for chunk in fileio.read_range(fd, start, end):
                pos += len(chunk)
                yield chunk
            if pos < end:
                raise CacheUnavailable(f"cached blob {self.digest} is shorter than its index entry")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
            self._cache.release(self.digest)


def scan_blobs(root: Path, expected: Callable[[str], int | None]) -> tuple[list[str], int]:
    """Start-up reconciliation's walk of ``blobs/`` (blocks: run it on a worker thread):
    the digests whose file is there with the size ``expected(digest)`` says; every other file
    (wrong size, no row, not named by a digest) is removed. (kept, number removed)."""
    present: list[str] = []
    removed = 0
    for algo_dir in root.iterdir():
        for prefix_dir in (algo_dir.iterdir() if algo_dir.is_dir() else ()):
            for entry in os.scandir(prefix_dir) if prefix_dir.is_dir() else ():
                digest = f"{algo_dir.name}:{entry.name}"
                ok = (DIGEST_RE.fullmatch(digest) and entry.name[:2] == prefix_dir.name
                      and entry.is_file(follow_symlinks=False)
                      and expected(digest) == entry.stat().st_size)
                if ok:
                    present.append(digest)
                else:
                    os.unlink(entry.path)
                    removed += 1
    return present, removed
