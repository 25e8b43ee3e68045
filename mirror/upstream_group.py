"""UpstreamGroup: one upstream's source of truth and its mirrors, behind Upstream's API.

An upstream is fetched from its ``url`` (the source of truth) and from the
``mirrors`` configured for it (accelerators, another site's mirror), each an
``Endpoint``: its own ``Upstream`` (own HTTP client, credentials, token cache and
health) plus what it may be asked:

- ``pull``: content addressed by digest (blobs, manifests by digest). Every digest is
  verified before anything is kept or completed, so a mirror cannot inject content:
  wrong bytes only move the fill on to the next endpoint.
- ``resolve``: tags too. The source of truth can always resolve.

``endpoints(capability)`` ranks the endpoints a request may use: healthy before
penalized (an endpoint that failed, served wrong bytes or was too slow sits out a
backoff), then mirrors before ``url`` in configured order (``prefer: order``) or by
measured speed (``prefer: fastest``). The proxy and the fills use the group as they
used a lone ``Upstream``; with no mirrors configured it behaves exactly as one.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx

from .config import UpstreamConfig
from .models import Manifest, ManifestInfo, References, Referrer
from .upstream import BlobStream, Upstream

PENALTY_FIRST = 30.0     # seconds an endpoint sits out after a failure; doubles ...
PENALTY_MAX = 600.0      # ... up to this


@dataclass
class Endpoint:
    upstream: Upstream
    label: str                          # host[:port] of its URL, for logs and metrics
    capabilities: frozenset[str]
    truth: bool = False                 # the upstream's own url
    penalized_until: float = 0.0        # monotonic
    penalty: float = 0.0                # the last backoff, doubled at the next failure
    speed: float | None = None          # bytes/s, moving average of blob downloads
    reasons: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.upstream.up and time.monotonic() >= self.penalized_until

    def penalize(self, reason: str) -> None:
        """Sit out a backoff (``PENALTY_FIRST``, doubling to ``PENALTY_MAX``)."""
        self.penalty = min(PENALTY_MAX, self.penalty * 2 if self.penalty else PENALTY_FIRST)
        self.penalized_until = time.monotonic() + self.penalty
        self.reasons = (self.reasons + [reason])[-5:]

    def succeeded(self) -> None:
        self.penalty = 0.0

    def measured(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes <= 0:
            return
        speed = nbytes / seconds
        self.speed = speed if self.speed is None else 0.7 * self.speed + 0.3 * speed


def _label(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2].lower()


class UpstreamGroup:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.name = config.name
        self.truth = Endpoint(Upstream(config, client), _label(config.url),
                              frozenset({"pull", "resolve"}), truth=True)
        self.mirrors = [Endpoint(Upstream(config.endpoint(m)), _label(m.url), m.capabilities)
                        for m in config.mirrors]

    async def aclose(self) -> None:
        for endpoint in [*self.mirrors, self.truth]:
            await endpoint.upstream.aclose()

    @property
    def up(self) -> bool:
        return self.truth.upstream.up or any(m.upstream.up for m in self.mirrors)

    def endpoints(self, capability: str) -> list[Endpoint]:
        """Who may be asked, best first (see the module doc)."""
        able = [e for e in [*self.mirrors, self.truth] if capability in e.capabilities]
        if self.config.prefer == "fastest":
            able.sort(key=lambda e: -(e.speed or 0.0))     # stable: configured order next
        return sorted(able, key=lambda e: not e.healthy)

    # -- the read API, as Upstream's (first version: the source of truth answers
    #    everything but blob bodies; the fills walk ``endpoints("pull")``)

    async def get_manifest(self, repository: str, reference: str, accept: list[str],
                           fallback: bool = False) -> tuple[Manifest, References]:
        return await self.truth.upstream.get_manifest(repository, reference, accept, fallback)

    async def head_manifest(self, repository: str, reference: str, accept: list[str],
                            fallback: bool = False) -> ManifestInfo | None:
        return await self.truth.upstream.head_manifest(repository, reference, accept, fallback)

    async def stat_blob(self, repository: str, digest: str) -> int:
        return await self.truth.upstream.stat_blob(repository, digest)

    async def tags(self, repository: str, fallback: bool = False) -> list[str]:
        return await self.truth.upstream.tags(repository, fallback)

    async def referrers(self, repository: str, digest: str,
                        fallback: bool = False) -> list[Referrer]:
        return await self.truth.upstream.referrers(repository, digest, fallback)

    # -- blob bodies: the fills walk ``endpoints("pull")`` themselves (fill.py)

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str, offset: int = 0,
                          endpoint: Endpoint | None = None) -> AsyncIterator[BlobStream]:
        """A blob's body from ``endpoint`` (default: the best ``pull`` endpoint)."""
        endpoint = endpoint or self.endpoints("pull")[0]
        async with endpoint.upstream.stream_blob(repository, digest, offset) as stream:
            yield stream
