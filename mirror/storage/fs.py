"""Blobs as files under ``data_dir/blobs/<alg>/<2 hex>/<hex>`` (the default store).

A file appears there only through ``os.replace`` of a temp file whose hash the cache
checked, after its bytes were ``fdatasync``'ed, and the rename and any new directory
are synced before ``commit`` returns (so before the index names it): a power loss never
leaves a row naming wrong bytes. Committed blobs open as ``CachedBlob``s, whose
descriptor api.py may hand to the server for a zero-copy send.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from .. import fileio
from ..cache_files import CachedBlob, Holds, TempBlob, blob_path, fsync_dir, make_dirs


class FsStore:
    name = "filesystem"
    local_files = True
    redirect = False

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)

    async def check(self) -> None:
        """The data directory was checked by the cache already."""

    async def not_ready(self) -> str | None:
        return None             # the cache checks that the data directory takes files

    def path_for(self, digest: str) -> Path:
        return blob_path(self.data_dir, digest)

    async def open(self, digest: str, size: int, holds: Holds) -> CachedBlob | None:
        try:
            fd = await fileio.open_read(self.path_for(digest))
        except FileNotFoundError:
            return None
        return CachedBlob(holds, fd, digest, size)

    async def size(self, digest: str) -> int | None:
        try:
            return (await fileio.run(os.stat, self.path_for(digest))).st_size
        except FileNotFoundError:
            return None

    async def upload(self, digest: str) -> None:
        return None           # the temp file itself becomes the blob

    async def commit(self, temp: TempBlob, digest: str) -> None:
        final = self.path_for(digest)

        def place() -> None:
            temp.fsync()
            temp.close()
            new_dirs = make_dirs(final.parent)
            os.replace(temp.path, final)
            # The rename, and any directory it needed, on disk before the index names it.
            for directory in (final.parent, *(d.parent for d in new_dirs)):
                fsync_dir(directory)
        await fileio.run(place)

    async def read(self, digest: str, start: int = 0,
                   end: int | None = None) -> AsyncIterator[bytes]:
        fd = await fileio.open_read(self.path_for(digest))
        try:
            stop = end if end is not None else (await fileio.run(os.fstat, fd)).st_size
            async for chunk in fileio.read_range(fd, start, stop):
                yield bytes(chunk)
        finally:
            os.close(fd)

    async def read_small(self, digest: str) -> bytes | None:
        try:
            return await fileio.run(self.path_for(digest).read_bytes)
        except FileNotFoundError:
            return None

    async def delete(self, digests: list[str]) -> None:
        paths = [self.path_for(d) for d in digests]

        def unlink() -> None:
            for path in paths:
                path.unlink(missing_ok=True)
        await fileio.run_to_end(unlink)

    async def presign(self, digest: str) -> str:
        raise NotImplementedError("a file-system store has no URLs to redirect to")
