"""The protocols the layers meet at.

``Source`` is the read side the API serves from. ``ProxyStore`` implements it (cache
first, then upstream); so could a bare cache (offline) or a bare upstream
(pass-through), and the routes would not change.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from .models import Manifest, ManifestInfo, Referrer


class BlobBody(Protocol):
    """Bytes of one blob, readable by range. ``size`` is None when not yet known."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int | None: ...

    @property
    def source(self) -> str:
        """Where its bytes come from ("cache", "upstream"), for the metrics."""
        ...

    async def wait_started(self) -> None:
        """Until ``size`` is known and the first bytes are readable (a download has
        begun); raises why not, so a failure to start is a clean error response."""
        ...

    async def wait_verified(self) -> None:
        """Until every byte of the blob is verified; raises why not. Only the end of
        the blob is held back until then: a range that stops short of it must wait
        here before its headers go out."""
        ...

    def chunks(self, start: int = 0,
               end: int | None = None) -> AsyncGenerator[bytes | bytearray, None]:
        """Bytes [start, end) (to the end when ``end`` is None). Raises if the bytes
        cannot all be delivered, so a response is aborted, never silently short.
        Ending (or closing) the iterator lets go of the body."""
        ...

    async def aclose(self) -> None:
        """Let go of the body without reading it (idempotent)."""
        ...


class ManifestSource(Protocol):
    async def get_manifest(self, repository: str, reference: str,
                           accept: list[str]) -> Manifest: ...

    async def head_manifest(self, repository: str, reference: str,
                            accept: list[str]) -> ManifestInfo: ...

    async def tags(self, repository: str) -> list[str]: ...

    async def referrers(self, repository: str, subject: str) -> list[Referrer]:
        """Manifests of the repository whose subject is ``subject`` (OCI v1.1)."""
        ...


class BlobSource(Protocol):
    async def open_blob(self, repository: str, digest: str) -> BlobBody: ...

    async def stat_blob(self, repository: str, digest: str) -> int: ...


class Source(ManifestSource, BlobSource, Protocol):
    async def aclose(self) -> None: ...
