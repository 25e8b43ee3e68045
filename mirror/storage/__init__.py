"""Where blobs' bytes live, behind one protocol (``BlobStore``): fs.py keeps them as
files under ``data_dir/blobs`` (the default), s3.py + s3_blobs.py in an S3-compatible
object store. May import models, errors, fileio, cache_files and config_scale; never
the index, api.py, the proxy or upstreams. obstore is imported only when S3 is
configured (``open_store``).

Whatever the backend, a blob being written is a temp file under ``data_dir/tmp``
(``cache_files.TempBlob``: readers in this process and in other workers follow it);
a backend that is not the file system gets the bytes as they arrive too (``upload``,
the tee), and ``commit`` makes them the blob only once the cache has checked their
digest: nothing unverified is ever visible under a blob's name.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..config_scale import StorageConfig

if TYPE_CHECKING:
    from ..cache_files import Holds, TempBlob


class StorageUnavailable(Exception):
    """The configured store cannot be used; the message is one line naming the key."""


class StoredBlob(Protocol):
    """A committed blob opened for a response (a ``BlobBody``), held against eviction
    until ``aclose``. A file-system one also has ``fileno()`` (zero-copy sends)."""

    source: str
    digest: str
    size: int

    async def wait_started(self) -> None: ...

    async def wait_verified(self) -> None: ...

    def chunks(self, start: int = 0,
               end: int | None = None) -> AsyncGenerator[bytes | bytearray, None]: ...

    async def aclose(self) -> None: ...


class Upload(Protocol):
    """A blob streamed into the store while it is written to its temp file; its hash is
    the temp file's (computed once, there)."""

    async def write(self, chunk: bytes | bytearray | memoryview) -> None: ...

    async def commit(self, verified: str) -> None: ...

    async def abort(self) -> None: ...


class BlobStore(Protocol):
    name: str              # "filesystem" or "s3", for the logs
    local_files: bool      # committed blobs are files under data_dir/blobs (path_for)
    redirect: bool         # blob GETs may be answered with a 307 to ``presign``

    async def check(self) -> None:
        """Start-up: raise StorageUnavailable (one line) when the store is unusable."""

    async def not_ready(self) -> str | None:
        """For ``/readyz``: why the store cannot be used now (None when it can), quickly."""

    async def open(self, digest: str, size: int, holds: Holds) -> StoredBlob | None:
        """The committed blob for reading (None: not there), held by ``holds``."""

    async def size(self, digest: str) -> int | None:
        """The committed blob's size, None when the store does not have it."""

    async def upload(self, digest: str) -> Upload | None:
        """A tee for a blob about to be written (None: the temp file becomes the blob)."""

    async def commit(self, temp: TempBlob, digest: str) -> None:
        """Make ``temp`` (whose digest the caller verified) the blob ``digest``: once this
        returns the bytes are durable under its name. Consumes ``temp``."""

    async def read(self, digest: str, start: int = 0,
                   end: int | None = None) -> AsyncIterator[bytes]:
        """Stream a committed blob's bytes (FileNotFoundError / BlobUnknown if gone)."""
        yield b""

    async def read_small(self, digest: str) -> bytes | None:
        """A small committed object (a manifest, a config) whole; None if not there."""

    async def delete(self, digests: list[str]) -> None:
        """Remove blobs (those already gone are fine); finishes even if cancelled."""

    async def presign(self, digest: str) -> str:
        """A URL that GETs the blob without credentials for a while."""
        return ""

    def path_for(self, digest: str) -> Path:
        """The committed file (``local_files`` only)."""
        raise NotImplementedError


def open_store(data_dir: Path, config: StorageConfig) -> BlobStore:
    """The store ``config`` names; StorageUnavailable when its client is missing."""
    if config.s3 is None:
        from .fs import FsStore
        return FsStore(data_dir)
    try:
        from .s3_blobs import S3Blobs
    except ImportError as exc:
        raise StorageUnavailable(
            f"storage.s3.bucket {config.s3.bucket}: the S3 client is not installed "
            f"({exc.name or exc}); install the s3 extra: pip install 'mirror[s3]'") from None
    return S3Blobs(config.s3)
