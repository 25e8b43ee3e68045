"""The cache's blob store on S3 (``storage: {s3: ...}``): ``S3Store`` (s3.py) behind
the ``BlobStore`` protocol.

- **Writing:** a fill's temp file stays under ``data_dir/tmp`` (this process's
  readers and the other workers follow it, as with files) and ``upload`` tees the
  same bytes into a multipart upload as they arrive. The temp file's hash is the one
  checked (the writer does not hash again); ``commit`` completes the upload only with
  that verified digest, then drops the temp file. A blob written without a tee (a
  hosted upload's session file, a manifest, an import) is streamed from its file at
  ``commit``. A wrong digest aborts the upload: no object, no upload left behind.
- **Reading:** ``open`` starts the object's GET, so a blob that is gone (evicted by
  another replica) is known before any header is sent, and one whose GET has begun
  is read to the end even if it is deleted meanwhile; its body is what the response
  streams. A ranged read starts a GET with ``Range`` (no descriptor: no zero-copy
  send). ``redirect: true`` makes api.py answer GETs of committed blobs with a 307
  to ``presign``'s URL, as registry:2 does; there ``open`` only checks (a ``HEAD``).
- **Start-up:** ``check`` lists the prefix once; a store that cannot be reached or a
  bucket that is not there is one line naming ``storage.s3.bucket`` and
  ``storage.s3.endpoint``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore

from .. import fileio
from ..cache_files import Holds, TempBlob
from ..config_scale import S3Config
from ..errors import BlobUnknown, CacheUnavailable
from . import StorageUnavailable
from .s3 import S3Store, S3Writer

log = logging.getLogger("mirror.storage.s3")

PRESIGN_FOR = timedelta(minutes=20)      # registry:2's redirect URLs live as long
CHECK_TIMEOUT = 30.0                     # seconds the start-up look at the bucket may take
READY_TIMEOUT = 3.0                      # and a /readyz look (load balancers wait ~5 s)
DELETES = 8                              # DELETEs in flight at once


class S3Upload:
    """The tee of one blob: an ``S3Writer`` that trusts the temp file's hash."""

    def __init__(self, writer: S3Writer) -> None:
        self.writer = writer

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        await self.writer.write(chunk)

    async def commit(self, verified: str) -> None:
        await self.writer.commit(verified)

    async def abort(self) -> None:
        await self.writer.abort()


class S3Blob:
    """A committed blob in the bucket, opened for a response: streamed with ``Range``,
    held against eviction until ``aclose``."""

    source = "cache"

    def __init__(self, blobs: S3Blobs, holds: Holds, digest: str, size: int,
                 started: Any = None) -> None:
        self._blobs = blobs
        self._holds: Holds | None = holds
        self._started = started         # the whole object's GET, begun by ``open``
        self.digest = digest
        self.size = size

    async def wait_started(self) -> None:
        """Committed: nothing to wait for."""

    async def wait_verified(self) -> None:
        """Committed blobs were verified before they were."""

    async def redirect_url(self) -> str | None:
        """Where a GET may be sent instead (``redirect: true``), else None."""
        if not self._blobs.redirect:
            return None
        return await self._blobs.presign(self.digest)

    async def chunks(self, start: int = 0,
                     end: int | None = None) -> AsyncGenerator[bytes | bytearray, None]:
        end = self.size if end is None else end
        started, self._started = self._started, None
        try:
            pos = start
            if started is not None and start == 0 and end == self.size:
                body = self._blobs.store.stream(self.digest, started)
            else:                       # a range: its own GET
                body = self._blobs.read(self.digest, start, end)
            async for chunk in body:
                pos += len(chunk)
                yield chunk
            if pos < end:
                raise CacheUnavailable(f"object of blob {self.digest} is shorter than its "
                                       "index entry")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        self._started = None            # a GET not read: dropping it closes its stream
        holds, self._holds = self._holds, None
        if holds is not None:
            holds.release(self.digest)


class S3Blobs:
    name = "s3"
    local_files = False

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self.redirect = config.redirect
        self.store = S3Store(config)

    def describe(self) -> str:
        prefix = f" prefix {self.config.prefix}" if self.config.prefix else ""
        endpoint = self.config.endpoint or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        return f"bucket {self.config.bucket}{prefix} at {endpoint}"

    async def check(self) -> None:
        endpoint = (self.config.endpoint or os.environ.get("AWS_ENDPOINT_URL")
                    or "(AWS default)")
        where = f"storage.s3.bucket {self.config.bucket!r} at storage.s3.endpoint {endpoint}"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                await obstore.list_with_delimiter_async(self.store.client,
                                                        f"{self.config.prefix}blobs/")
        except TimeoutError:
            raise StorageUnavailable(f"{where}: no answer within {CHECK_TIMEOUT:g}s") from None
        except Exception as exc:
            text = " ".join(str(exc).split())
            raise StorageUnavailable(f"{where}: cannot be used: {_reason(text)}") from None

    async def not_ready(self) -> str | None:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await obstore.list_with_delimiter_async(self.store.client,
                                                        f"{self.config.prefix}blobs/")
        except TimeoutError:
            return f"storage.s3: bucket {self.config.bucket}: no answer within {READY_TIMEOUT:g}s"
        except Exception as exc:
            text = " ".join(str(exc).split())
            return f"storage.s3: bucket {self.config.bucket}: {_reason(text)}"
        return None

    def path_for(self, digest: str) -> Path:
        raise NotImplementedError("blobs are objects in a bucket, not files")

    async def open(self, digest: str, size: int, holds: Holds) -> S3Blob | None:
        if self.redirect:               # the client will GET it from the store itself
            if await self.store.exists(digest) is None:
                return None
            return S3Blob(self, holds, digest, size)
        started = await self.store.get(digest)
        if started is None:
            return None
        return S3Blob(self, holds, digest, size, started)

    async def size(self, digest: str) -> int | None:
        return await self.store.exists(digest)

    async def upload(self, digest: str) -> S3Upload:
        return S3Upload(await self.store.writer(digest, hashing=False))

    async def commit(self, temp: TempBlob, digest: str) -> None:
        upload, temp.upload = temp.upload, None
        try:
            await fileio.run(temp.close)
            if isinstance(upload, S3Upload):
                await upload.commit(temp.digest)
            else:                   # written without a tee: stream it from its file now
                if upload is not None:
                    await upload.abort()
                await self._put_file(temp, digest)
        except BaseException:
            if upload is not None:
                await asyncio.shield(upload.abort())
            raise
        await fileio.run_to_end(_unlink, temp.path)

    async def _put_file(self, temp: TempBlob, digest: str) -> None:
        writer = await self.store.writer(digest, hashing=False)
        async with writer:
            fd = await fileio.open_read(temp.path)
            try:
                async for chunk in fileio.read_range(fd, 0, temp.size):
                    await writer.write(bytes(chunk))
            finally:
                os.close(fd)
            if writer.size != temp.size:
                raise CacheUnavailable(f"{temp.path} is shorter than the blob {digest}")
            await writer.commit(temp.digest)

    def read(self, digest: str, start: int = 0,
             end: int | None = None) -> AsyncIterator[bytes]:
        return self.store.read(digest, start, end)

    async def read_small(self, digest: str) -> bytes | None:
        try:
            return b"".join([chunk async for chunk in self.store.read(digest)])
        except BlobUnknown:
            return None

    async def delete(self, digests: list[str]) -> None:
        async def some(batch: list[str]) -> None:
            for digest in batch:
                try:
                    await self.store.delete(digest)
                except CacheUnavailable as exc:
                    log.error("%s", exc.message)
        batches = [digests[i::DELETES] for i in range(min(DELETES, len(digests)))]
        await asyncio.shield(asyncio.gather(*(some(b) for b in batches)))

    async def presign(self, digest: str) -> str:
        return await self.store.presign(digest, PRESIGN_FOR)


def _unlink(path: os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _reason(text: str) -> str:
    """The useful part of object_store's long error text."""
    for marker in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId",
                   "SignatureDoesNotMatch", "Connection refused", "dns error",
                   "error sending request", "timed out"):
        if marker in text:
            return f"{marker} ({text[:200]})"
    return text[:300]
