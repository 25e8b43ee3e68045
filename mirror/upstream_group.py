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

How the read API walks them:

- By digest (manifests, blob sizes): each ``pull`` endpoint in turn. A failure
  (transport, 5xx, 429, wrong digest) penalizes the endpoint and moves on; a mirror's
  404 or denial moves on without penalty (a mirror may lack content); the source of
  truth's 404 is the answer. The last error is what the caller sees.
- By tag: only ``resolve`` endpoints are asked, so a pull-only accelerator's tags are
  never used. With pull mirrors, the tag is HEADed (free on Docker Hub's pull limit)
  and the bytes fetched by digest from the best ``pull`` endpoint; a GET by tag only
  when the HEAD gives no digest. An endpoint whose last ``ratelimit-remaining`` is at
  or below ``ratelimit_reserve`` gets no GET by tag (HEADs still go).
- Tag lists and referrers: ``url`` first, the ``resolve`` mirrors when it is unavailable.

A request a cached copy can answer (``fallback=True``) gets ``revalidate_timeout`` for
the whole walk, and skips endpoints known to be down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import httpx

from . import metrics, upstream_status
from .config import UpstreamConfig
from .errors import (
    BlobUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    UpstreamBadContent,
    UpstreamRateLimited,
    UpstreamUnavailable,
)
from .models import SCHEMA1_TYPES, Manifest, ManifestInfo, References, Referrer, is_digest
from .upstream import BlobStream, Upstream
from .upstream_client import source_label

log = logging.getLogger("mirror.upstream")
T = TypeVar("T")
NOT_THERE = (BlobUnknown, ManifestUnknown, NameUnknown)
NOT_PENALIZED = ("down", "ratelimit_reserve")    # skipped without asking: no new failure

PENALTY_FIRST = 30.0     # seconds an endpoint sits out after a failure; doubles ...
PENALTY_MAX = 600.0      # ... up to this


@dataclass(eq=False)      # an endpoint is itself: compared by identity
class Endpoint:
    upstream: Upstream
    label: str                          # host[:port] of its URL, for logs and metrics
    capabilities: frozenset[str]
    truth: bool = False                 # the upstream's own url
    penalized_until: float = 0.0        # monotonic
    penalty: float = 0.0                # the last backoff, doubled at the next failure
    speed: float | None = None          # bytes/s, moving average of blob downloads

    @property
    def healthy(self) -> bool:
        return self.upstream.up and time.monotonic() >= self.penalized_until

    def penalize(self, reason: str) -> None:
        """Sit out a backoff (``PENALTY_FIRST``, doubling to ``PENALTY_MAX``)."""
        self.penalty = min(PENALTY_MAX, self.penalty * 2 if self.penalty else PENALTY_FIRST)
        self.penalized_until = time.monotonic() + self.penalty
        upstream_status.error(self.upstream.name, self.label,
                              reason.removeprefix(f"upstream {self.upstream.name}: "))
        log.debug("upstream %s: %s sits out %gs: %s", self.upstream.name, self.label,
                  self.penalty, reason)

    def succeeded(self) -> None:
        self.penalty = 0.0

    def measured(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes <= 0:
            return
        speed = nbytes / seconds
        self.speed = speed if self.speed is None else 0.7 * self.speed + 0.3 * speed


class UpstreamGroup:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.name = config.name
        self.truth = Endpoint(Upstream(config, client), source_label(config.url),
                              frozenset({"pull", "resolve"}), truth=True)
        self.mirrors = [Endpoint(Upstream(config.endpoint(m), mirror=True), source_label(m.url),
                                 m.capabilities) for m in config.mirrors]
        self._denied_logged: set[str] = set()
        self._reserve_logged: set[str] = set()
        metrics.upstream_up.labels(self.name).set_function(lambda: float(self.up))
        for e in [*self.mirrors, self.truth]:
            self._gauges(e)

    def _gauges(self, e: Endpoint) -> None:
        metrics.upstream_source_up.labels(self.name, e.label).set_function(
            lambda: float(e.healthy))
        metrics.upstream_source_speed.labels(self.name, e.label).set_function(
            lambda: e.speed or 0.0)
        if self.config.ratelimit_reserve:
            metrics.upstream_ratelimit_reserve_hit.labels(self.name, e.label).set_function(
                lambda: float(self.reserved(e)))

    async def aclose(self) -> None:
        for endpoint in [*self.mirrors, self.truth]:
            await endpoint.upstream.aclose()

    @property
    def up(self) -> bool:
        """Whether any source could answer: url, or a mirror."""
        return self.truth.upstream.up or any(m.upstream.up for m in self.mirrors)

    def endpoints(self, capability: str) -> list[Endpoint]:
        """Who may be asked, best first (see the module doc)."""
        able = [e for e in [*self.mirrors, self.truth] if capability in e.capabilities]
        if self.config.prefer == "fastest":
            # Not measured yet ranks first, so each is measured once; then the fastest.
            # The sort is stable: configured order among equals.
            able.sort(key=lambda e: -(e.speed if e.speed is not None else float("inf")))
        return sorted(able, key=lambda e: not e.healthy)

    def reserved(self, e: Endpoint) -> bool:
        """Whether ``e``'s last ``ratelimit-remaining`` is at or below ``ratelimit_reserve``
        (then it gets no GET of a tag); logged once each time it starts."""
        reserve, left = self.config.ratelimit_reserve, e.upstream.ratelimit_remaining
        hit = bool(reserve) and left is not None and left <= reserve
        if hit and e.label not in self._reserve_logged:
            self._reserve_logged.add(e.label)
            log.warning("upstream %s: %s has %s pulls left (ratelimit_reserve %d): no GETs of "
                        "tags go to it; cached tags are served stale or resolved by resolve "
                        "mirrors", self.name, e.label, left, reserve)
        elif not hit and e.label in self._reserve_logged:
            self._reserve_logged.discard(e.label)
            log.warning("upstream %s: %s has %s pulls left again: tags are fetched from it",
                        self.name, e.label, left)
        return hit

    # -- the read API, as Upstream's (blob bodies: the fills walk ``endpoints("pull")``)

    async def get_manifest(self, repository: str, reference: str, accept: list[str],
                           fallback: bool = False) -> tuple[Manifest, References]:
        if is_digest(reference):
            return await self._manifest_by_digest(repository, reference, accept, fallback)
        what = f"manifest {repository}:{reference}"

        async def resolve(e: Endpoint) -> tuple[Manifest, References] | ManifestInfo:
            if self.mirrors or self.reserved(e):
                # The tag's digest from a HEAD (free), the bytes from the best pull source.
                info = await e.upstream.head_manifest(repository, reference, accept, fallback)
                if info is not None and info.media_type not in SCHEMA1_TYPES:
                    return info
            if self.reserved(e):
                raise UpstreamUnavailable(
                    f"upstream {self.name}: {e.label} has {e.upstream.ratelimit_remaining} pulls "
                    f"left (ratelimit_reserve {self.config.ratelimit_reserve}): {what} not asked",
                    detail={"upstream": self.name, "reason": "ratelimit_reserve"})
            return await e.upstream.get_manifest(repository, reference, accept, fallback)

        e, found = await self._walk(self.endpoints("resolve"), what, resolve, fallback)
        if isinstance(found, ManifestInfo):
            return await self._manifest_by_digest(repository, found.digest, accept, fallback)
        return self._got(e, found)

    def note_source(self, e: Endpoint) -> None:
        """The access log's ``miss@<source>`` for what ``e`` served: said only when the
        upstream has mirrors (with ``url`` alone there is no choice to tell)."""
        if self.mirrors:
            metrics.sourced(e.label)

    def _got(self, e: Endpoint, found: tuple[Manifest, References]) -> tuple[Manifest, References]:
        """A manifest fetched from ``e``: the access log and the per-source bytes say so."""
        self.note_source(e)
        metrics.source_bytes(self.name, e.label, found[0].size)
        return found

    async def _manifest_by_digest(self, repository: str, digest: str, accept: list[str],
                                  fallback: bool) -> tuple[Manifest, References]:
        # A source in its rate-limit reserve is spared GETs a cached copy could stand in for.
        able = [e for e in self.endpoints("pull") if not (fallback and self.reserved(e))]
        e, found = await self._walk(
            able, f"manifest {repository}@{digest}",
            lambda e: e.upstream.get_manifest(repository, digest, accept, fallback), fallback)
        return self._got(e, found)

    async def head_manifest(self, repository: str, reference: str, accept: list[str],
                            fallback: bool = False) -> ManifestInfo | None:
        able = self.endpoints("pull" if is_digest(reference) else "resolve")
        _, info = await self._walk(
            able, f"manifest {repository}:{reference}",
            lambda e: e.upstream.head_manifest(repository, reference, accept, fallback), fallback)
        return info

    async def stat_blob(self, repository: str, digest: str) -> int:
        _, size = await self._walk(self.endpoints("pull"), f"blob {repository}@{digest}",
                                   lambda e: e.upstream.stat_blob(repository, digest), False)
        return size

    def _url_first(self) -> list[Endpoint]:
        return [self.truth, *(m for m in self.mirrors if "resolve" in m.capabilities)]

    async def tags(self, repository: str, fallback: bool = False) -> list[str]:
        _, tags = await self._walk(self._url_first(), f"tag list of {repository}",
                                   lambda e: e.upstream.tags(repository, fallback), fallback)
        return tags

    async def referrers(self, repository: str, digest: str,
                        fallback: bool = False) -> list[Referrer]:
        _, found = await self._walk(
            self._url_first(), f"referrers of {repository}@{digest}",
            lambda e: e.upstream.referrers(repository, digest, fallback), fallback)
        return found

    # -- the walk ------------------------------------------------------------------------

    async def _walk(self, able: list[Endpoint], what: str,
                    call: Callable[[Endpoint], Awaitable[T]], fallback: bool) -> tuple[Endpoint, T]:
        """``call`` each endpoint of ``able`` in turn until one answers (see the module
        doc); with ``fallback``, all within ``revalidate_timeout``."""
        if not fallback or len(able) < 2:
            return await self._try_each(able, what, call)
        limit = self.config.revalidate_timeout
        asking: list[Endpoint] = []
        try:
            async with asyncio.timeout(limit):
                return await self._try_each(able, what, call, asking)
        except TimeoutError:
            if asking:       # the one that hung is known to be down from now on
                asking[-1].upstream.mark_down(f"no answer within revalidate_timeout {limit:g}s")
            raise UpstreamUnavailable(f"upstream {self.name}: no source answered {what} within "
                                      f"revalidate_timeout {limit:g}s",
                                      detail={"upstream": self.name, "reason": "timeout"}) from None

    async def _try_each(self, able: list[Endpoint], what: str,
                        call: Callable[[Endpoint], Awaitable[T]],
                        asking: list[Endpoint] | None = None) -> tuple[Endpoint, T]:
        last: RegistryError | None = None
        truth_failed: UpstreamUnavailable | None = None
        for e in able:
            if asking is not None:
                asking.append(e)
            try:
                result = await call(e)
            except NOT_THERE as exc:
                if e.truth:
                    raise                   # the source of truth says it is not there
                last = exc                  # a mirror may lack content: no penalty
            except Denied as exc:
                if e.truth:
                    raise
                if e.label not in self._denied_logged:
                    self._denied_logged.add(e.label)
                    log.warning("upstream %s: mirror %s denied access (%s); moving on to the "
                                "next source", self.name, e.label, exc.message)
                metrics.source_error(self.name, e.label, "denied")
                last = exc
            except UpstreamUnavailable as exc:
                reason = (exc.detail or {}).get("reason")
                if reason not in NOT_PENALIZED:
                    e.penalize(exc.message)
                    metrics.source_error(self.name, e.label, error_reason(exc))
                if len(able) > 1:
                    log.info("upstream %s: %s failed for %s (%s); trying the next source",
                             self.name, e.label, what, exc.message)
                last = exc
                if e.truth:
                    truth_failed = exc
            except RegistryError as exc:
                if e.truth:
                    raise
                last = exc
            else:
                e.succeeded()
                return e, result
        # A mirror lacking what url could not be asked for is no answer: url's failure is.
        error = truth_failed or last
        if error is None:
            raise UpstreamUnavailable(f"upstream {self.name}: no source may be asked for {what}",
                                      detail={"upstream": self.name, "reason": "down"})
        raise error


    # -- blob bodies: the fills walk ``endpoints("pull")`` themselves (fill.py)

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str, offset: int = 0,
                          endpoint: Endpoint | None = None) -> AsyncIterator[BlobStream]:
        """A blob's body from ``endpoint`` (default: the best ``pull`` endpoint)."""
        endpoint = endpoint or self.endpoints("pull")[0]
        async with endpoint.upstream.stream_blob(repository, digest, offset) as stream:
            yield stream


def error_reason(exc: UpstreamUnavailable) -> str:
    """The ``reason`` label of ``mirror_upstream_source_errors_total`` for ``exc``."""
    if isinstance(exc, UpstreamBadContent):
        return "bad_content"
    if isinstance(exc, UpstreamRateLimited):
        return "rate_limited"
    return "unavailable"
