"""Blobs in an S3-compatible object store (AWS S3, SeaweedFS, MinIO, moto, ...).

``S3Store`` keeps each blob under ``<prefix>blobs/<algorithm>/<2 hex>/<hex>``, the
same content-addressed layout as the filesystem cache. s3_blobs.py puts it behind the
cache's ``BlobStore`` protocol; nothing here touches the index.

Writing (``await store.writer(digest)``): the caller feeds chunks to the writer,
which hashes them on the way (on a worker thread for big chunks). The first
``part_size`` bytes are held in memory; a blob that ends within them is sent with
one ``PUT`` carrying ``If-None-Match: *`` (create-only: a blob already there is
left alone and the write counts as done). A bigger blob streams as a multipart
upload straight to its final key, at most ``max_concurrency`` parts in flight
(memory stays bounded by that, never the whole blob). ``commit()`` compares the
digest first: on a match the upload is completed, and the object appears under its
key atomically, whole and verified, at ``CompleteMultipartUpload``; on a mismatch,
or on ``abort()``, the stream handed to obstore ends with an error, obstore aborts
the multipart upload, and no object or upload is left. So no partial or unverified
object is ever visible under a final key, with no rename (S3 has none) and no copy.
obstore 0.12 cannot put ``If-None-Match`` on a multipart completion, so two writers
of one big digest both complete: the second replaces the object with the same bytes,
which content addressing makes harmless (a reader sees one whole version or the
other). Upload parts of a writer that dies with its process are not aborted: give
the bucket a lifecycle rule (AbortIncompleteMultipartUpload) as for any S3 client.

Reading: ``exists`` is a ``HEAD``; ``read`` streams a ``GET`` with ``Range``;
``presign`` signs a ``GET`` URL for ``redirect: true`` (a 307 to the store, as
registry:2's ``storage.redirect`` does).

The client is obstore (object_store's Rust S3 client, async, no dependencies),
chosen over aiobotocore by ``bench/s3_client.py`` (200 MB streamed up in 1 MiB
chunks as 8 MiB parts, then down, against moto's server on loopback, this
2-core machine): obstore 0.74 CPU-s/GB up, 0.36-0.38 down, 130-151 MB/s up (moto's
own CPU is the bound); aiobotocore 3.10 1.59-1.71 CPU-s/GB up, 0.23-0.25 down,
108-112 MB/s up. Uploads are what a fill does while clients wait, and aiobotocore
pins one botocore release, which fights with anything else that uses boto3.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import AlreadyExistsError, NotFoundError, PreconditionError
from obstore.store import S3Store as _ObjectStore

from ..config_scale import S3Config
from ..errors import BlobUnknown, CacheUnavailable, DigestInvalid
from ..models import HASHES, validate_digest

if TYPE_CHECKING:
    from hashlib import _Hash

    from obstore.store import ClientConfig, RetryConfig

log = logging.getLogger("mirror.storage.s3")

# obstore raises Python's own FileNotFoundError / FileExistsError for some calls and its
# named exceptions for others: catch both.
_MISSING = (NotFoundError, FileNotFoundError)
_PRESENT = (AlreadyExistsError, PreconditionError, FileExistsError)

PART_SIZE = 8 << 20          # multipart part size (S3's minimum is 5 MiB)
MAX_CONCURRENCY = 4          # parts in flight per writer: bounds a writer's memory
READ_CHUNK = 1 << 20         # chunks of a read stream
INLINE_HASH = 64 << 10       # chunks smaller than this are hashed on the event loop
QUEUE_CHUNKS = 8             # chunks waiting for obstore, per writer
# object_store's timeout covers a whole request, body included: a streamed GET to a
# slow client must not be cut at its default 30 s.
REQUEST_TIMEOUT = timedelta(hours=6)
CONNECT_TIMEOUT = timedelta(seconds=10)
# object_store retries a failed request for up to 3 minutes by default; a client waiting
# on a blob is better served by a 503 sooner (a fill resumes on its own).
RETRIES = 3
RETRY_TIMEOUT = timedelta(seconds=20)


class _Stop(Exception):
    """Ends the stream handed to obstore so that it aborts the multipart upload."""


_COMMIT = object()
_ABORT = object()


class S3Writer:
    """One blob being written; feed it with ``write``, then ``commit`` or ``abort``.
    As an async context manager it aborts on the way out unless committed (an error or
    a cancellation in the caller leaves nothing behind)."""

    def __init__(self, store: S3Store, digest: str, key: str, hashing: bool = True) -> None:
        self._store = store
        self.digest = digest
        self.key = key
        algorithm = digest.split(":", 1)[0]
        # hashing False: the caller hashes the same bytes (the cache's temp file does)
        # and hands its result to ``commit``: one hash per blob, not two.
        self._hasher: _Hash | None = HASHES[algorithm]() if hashing else None
        self._algorithm = algorithm
        self.size = 0
        self._head = bytearray()        # the first part, until the upload starts
        self._queue: asyncio.Queue[object] = asyncio.Queue(QUEUE_CHUNKS)
        self._upload: asyncio.Future[Any] | None = None
        self._finished = False

    async def __aenter__(self) -> S3Writer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.abort()

    async def write(self, chunk: bytes | bytearray | memoryview) -> None:
        if self._finished:
            raise RuntimeError(f"writer for {self.digest} is already finished")
        if self._hasher is None:
            pass
        elif len(chunk) >= INLINE_HASH:
            await asyncio.to_thread(self._hasher.update, chunk)
        else:
            self._hasher.update(chunk)
        self.size += len(chunk)
        if self._upload is None:
            self._head += chunk
            if len(self._head) > self._store.part_size:
                self._upload = asyncio.ensure_future(obstore.put_async(
                    self._store.client, self.key, self._parts(),
                    chunk_size=self._store.part_size,
                    max_concurrency=self._store.max_concurrency))
            return
        await self._feed(bytes(chunk))

    async def _parts(self) -> AsyncIterator[bytes]:
        head, self._head = bytes(self._head), bytearray()
        yield head
        while True:
            item = await self._queue.get()
            if item is _COMMIT:
                return
            if item is _ABORT:
                raise _Stop(self.digest)
            assert isinstance(item, bytes)
            yield item

    async def _feed(self, item: object) -> None:
        """Queue ``item`` for the upload, or raise the upload's error if it died."""
        assert self._upload is not None
        put = asyncio.ensure_future(self._queue.put(item))
        try:
            await asyncio.wait({put, self._upload}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()
        if not put.done() or put.cancelled():
            await self._settle()   # the upload ended first: raises its error

    async def _settle(self) -> None:
        assert self._upload is not None
        try:
            # shielded: a caller cancelled here must not drop obstore's request halfway
            # (a completion finishes, verified; an abort still aborts)
            await asyncio.shield(self._upload)
        except _Stop:
            raise
        except Exception as exc:
            raise CacheUnavailable(f"object store upload of {self.digest} failed: "
                                   f"{str(exc)[:300]}") from exc
        if not self._finished:
            raise CacheUnavailable(f"object store upload of {self.digest} ended early")

    async def commit(self, actual: str | None = None) -> int:
        """Verify the bytes written against the digest and only then make the blob
        visible. Returns its size; raises DigestInvalid (and leaves nothing) on a
        mismatch. ``actual``: the digest the caller computed of the same bytes (a
        writer made with ``hashing=False`` needs it)."""
        if self._finished:
            raise RuntimeError(f"writer for {self.digest} is already finished")
        if self._hasher is not None:
            actual = f"{self._algorithm}:{self._hasher.hexdigest()}"
        elif actual is None:
            raise ValueError("a writer that does not hash needs the digest of its bytes")
        if actual != self.digest:
            await self.abort()
            raise DigestInvalid(f"content hashes to {actual}, not {self.digest}",
                                detail={"digest": self.digest})
        if self._upload is None:
            self._finished = True
            try:
                await obstore.put_async(self._store.client, self.key, bytes(self._head),
                                        mode="create")
            except _PRESENT:
                pass                    # content-addressed: the same bytes are there
            except Exception as exc:
                raise CacheUnavailable(f"object store put of {self.digest} failed: "
                                       f"{str(exc)[:300]}") from exc
            finally:
                self._head = bytearray()
            return self.size
        await self._feed(_COMMIT)
        self._finished = True
        await self._settle()
        return self.size

    async def abort(self) -> None:
        """Give the blob up: the multipart upload (if one started) is aborted."""
        if self._finished:
            return
        self._finished = True
        self._head = bytearray()
        if self._upload is None:
            return
        if not self._upload.done():
            put = asyncio.ensure_future(self._queue.put(_ABORT))
            await asyncio.wait({put, self._upload}, return_when=asyncio.FIRST_COMPLETED)
            if not put.done():
                put.cancel()
        try:
            await asyncio.shield(self._upload)
        except _Stop:
            pass
        except Exception as exc:       # the upload had already failed; obstore aborted it
            log.warning("object store upload of %s failed before abort: %s",
                        self.digest, str(exc)[:300])


class S3Store:
    """Blobs in one bucket under ``prefix``."""

    def __init__(self, config: S3Config, part_size: int = PART_SIZE,
                 max_concurrency: int = MAX_CONCURRENCY) -> None:
        if part_size < 5 << 20:
            raise ValueError("part_size must be at least 5 MiB (S3's minimum part)")
        if config.prefix and not config.prefix.endswith("/"):
            config = replace(config, prefix=config.prefix + "/")
        self.config = config
        self.part_size = part_size
        self.max_concurrency = max_concurrency
        settings: dict[str, Any] = {}
        if config.endpoint:
            settings["endpoint"] = config.endpoint
        if config.region:
            settings["region"] = config.region
        if config.access_key:
            settings["access_key_id"] = config.access_key
        if config.secret_key:
            settings["secret_access_key"] = config.secret_key
        client_options: ClientConfig = {"timeout": REQUEST_TIMEOUT,
                                          "connect_timeout": CONNECT_TIMEOUT}
        endpoint = config.endpoint or os.environ.get("AWS_ENDPOINT_URL", "")
        if endpoint.startswith("http://"):
            client_options["allow_http"] = True
        retry: RetryConfig = {"max_retries": RETRIES, "retry_timeout": RETRY_TIMEOUT}
        self.client = _ObjectStore(config.bucket, client_options=client_options,
                                   retry_config=retry, **settings)

    def key(self, digest: str) -> str:
        """The object key of ``digest``; raises DigestInvalid on anything but a digest."""
        algorithm, hexpart = validate_digest(digest).split(":", 1)
        return f"{self.config.prefix}blobs/{algorithm}/{hexpart[:2]}/{hexpart}"

    async def writer(self, digest: str, hashing: bool = True) -> S3Writer:
        return S3Writer(self, digest, self.key(digest), hashing)

    async def exists(self, digest: str) -> int | None:
        """The blob's size, or None when the store does not have it."""
        key = self.key(digest)
        try:
            meta = await obstore.head_async(self.client, key)
        except _MISSING:
            return None
        except Exception as exc:
            raise CacheUnavailable(f"object store HEAD of {digest} failed: "
                                   f"{str(exc)[:300]}") from exc
        return int(meta["size"])

    async def get(self, digest: str, start: int = 0, end: int | None = None) -> Any | None:
        """Start a GET of bytes ``start`` to ``end`` (exclusive; None: to the end) of a
        blob: the answer whose body ``stream`` reads, or None when the store does not
        have the blob. A GET that has begun keeps its object's bytes even if the object
        is deleted meanwhile (by another replica's eviction)."""
        key = self.key(digest)
        if start < 0 or (end is not None and end <= start):
            raise ValueError(f"bad range {start}-{end}")
        options: dict[str, Any] = {}
        if end is not None:
            options["range"] = (start, end)
        elif start:
            options["range"] = {"offset": start}
        try:
            return await obstore.get_async(self.client, key, options=options)  # type: ignore[arg-type]
        except _MISSING:
            return None
        except Exception as exc:
            raise CacheUnavailable(f"object store GET of {digest} failed: "
                                   f"{str(exc)[:300]}") from exc

    async def stream(self, digest: str, started: Any) -> AsyncIterator[bytes]:
        """The body of a GET ``get`` started."""
        try:
            async for chunk in started.stream(min_chunk_size=READ_CHUNK):
                yield bytes(chunk)
        except Exception as exc:
            raise CacheUnavailable(f"object store GET of {digest} broke: "
                                   f"{str(exc)[:300]}") from exc

    async def read(self, digest: str, start: int = 0,
                   end: int | None = None) -> AsyncIterator[bytes]:
        """Stream bytes ``start`` to ``end`` (exclusive; None: to the end) of a blob.
        Raises BlobUnknown when it is not there."""
        if end is not None and end == start and start >= 0:
            return
        started = await self.get(digest, start, end)
        if started is None:
            raise BlobUnknown(detail={"digest": digest})
        async for chunk in self.stream(digest, started):
            yield chunk

    async def delete(self, digest: str) -> None:
        """Remove a blob; removing one that is not there is not an error."""
        key = self.key(digest)
        try:
            await obstore.delete_async(self.client, key)
        except _MISSING:
            pass
        except Exception as exc:
            raise CacheUnavailable(f"object store DELETE of {digest} failed: "
                                   f"{str(exc)[:300]}") from exc

    async def presign(self, digest: str, expires: timedelta | float = 300) -> str:
        """A URL that GETs the blob without credentials until ``expires`` (seconds)."""
        key = self.key(digest)
        if not isinstance(expires, timedelta):
            expires = timedelta(seconds=expires)
        return str(await obstore.sign_async(self.client, "GET", key, expires))

