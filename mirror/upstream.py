"""Upstream: the one place that talks to an upstream registry.

Two ``httpx.AsyncClient``s per upstream: blob bodies (``stream_blob``, with its
redirects and retries) go through one sized to ``max_fills``, everything else
(manifests, HEADs, tags, tokens) through the other, so downloads can never take
the connections a manifest needs. Requests go out anonymously until the
upstream answers 401 with a challenge; then Basic credentials or a Bearer token
(fetched from the challenge's realm, cached per scope until shortly before it
expires) are added and the request is retried once. Redirects are followed by
hand so ``Authorization`` is only ever sent to the upstream's own origin.

Credentials stay on the upstream's own site: only a 401 from the upstream's own
origin sets the challenge (a CDN's 401 is just an error), and a token realm gets
the username and password only when its host is the upstream's host (any port),
shares its registrable domain (``registrable_domain``: registry-1.docker.io and
auth.docker.io), or is listed in ``token_realms``; otherwise it is refused (the
rules and the bounded token cache live in ``upstream_auth``).

Requests that a cached copy could answer (``fallback=True``: tag revalidation)
get ``revalidate_timeout`` for the whole exchange. A transport failure marks the
upstream down: until a background probe of ``/v2/`` gets an answer, fallback
requests fail at once without touching the network, so stale copies are served
without waiting; misses (nothing cached) are still tried with the normal timeout.
Upstream failures become ``RegistryError``s in ``upstream_errors`` and nowhere else.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from . import __version__, metrics, upstream_errors
from .config import UpstreamConfig
from .errors import (Denied, RegistryError,
                     UpstreamBadContent, UpstreamRateLimited, UpstreamUnavailable)
from .models import (DEFAULT_ACCEPT, DIGEST_RE, DOCKER_SCHEMA1_SIGNED, MANIFEST_MAX,
                     SCHEMA1_TYPES, TAG_RE, Manifest, ManifestInfo, References, is_digest,
                     parse_manifest, schema1_digest)
from .upstream_auth import (Challenge, TokenCache, is_loopback, origin, parse_challenge,
                            realm_allowed)

log = logging.getLogger("mirror.upstream")
T = TypeVar("T")

# httpcore reads the socket 64 KiB at a time, and every read costs a trip through
# h11 and anyio: most of the CPU of a cold blob. 1 MiB reads cut that several times.
if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", None) == 64 * 1024:
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024

REDIRECTS = {301, 302, 303, 307, 308}
RETRY_STATUSES = {500, 502, 503, 504}
RETRY_BACKOFF = 0.25    # seconds before the first retry; x3 for each one after
MAX_REDIRECTS = 5
TAG_PAGES = 50          # tags/list pages followed before giving up on the rest
ERROR_BODY_MAX = 64 * 1024
TOKEN_BODY_MAX = 64 * 1024  # a token response larger than this is refused
TOKEN_SCOPES_MAX = 2048     # cached tokens (one per repository scope), least recently used go
PROBE_FIRST = 1.0           # seconds from "down" to the first background probe; doubles ...
PROBE_MAX = 30.0            # ... up to this


# The client a request goes out on: set for the span of a blob download, so its
# redirects and retries stay on the blob connections without every layer passing it.
_transfer_client: contextvars.ContextVar[httpx.AsyncClient | None] = contextvars.ContextVar(
    "mirror_upstream_client", default=None)


class Upstream:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.name = config.name
        self._origin = origin(config.url)
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32),
            headers={"User-Agent": f"mirror/{__version__}"},
            follow_redirects=False,
        )
        # One connection per fill slot (proxy.py holds at most max_fills downloads).
        self._blob_client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=config.max_fills,
                                max_keepalive_connections=config.max_fills),
            headers={"User-Agent": f"mirror/{__version__}"},
            follow_redirects=False,
        )
        self._challenge: Challenge | None = None
        self._tokens = TokenCache(TOKEN_SCOPES_MAX)
        self._down_since: float | None = None                # monotonic; None while up
        self._probe: asyncio.Task | None = None
        metrics.upstream_up.labels(self.name).set(1)

    async def aclose(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self._client.aclose()
        if self._blob_client is not self._client:
            await self._blob_client.aclose()

    @property
    def up(self) -> bool:
        """False after a transport failure until a probe (or any request) gets an answer."""
        return self._down_since is None

    # -- the read API --------------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str, accept: list[str],
                           fallback: bool = False) -> tuple[Manifest, References]:
        """``fallback``: the caller has a cached copy to serve instead (see the module doc)."""
        return await self._bounded(fallback, f"manifest {repository}:{reference}",
                                   lambda: self._get_manifest(repository, reference, accept))

    async def _get_manifest(self, repository: str, reference: str,
                            accept: list[str]) -> tuple[Manifest, References]:
        async with self._stream("GET", self._url(repository, "manifests", reference), repository,
                                self._accept_headers(accept), what="manifest") as resp:
            data = bytearray()
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > MANIFEST_MAX:
                    raise UpstreamBadContent(f"upstream {self.name}: manifest larger than "
                                             f"{MANIFEST_MAX} bytes")
            data = bytes(data)
            content_type = resp.headers.get("content-type")
            header_digest = resp.headers.get("docker-content-digest")
        try:
            media_type, refs = parse_manifest(data, content_type)
        except RegistryError as exc:
            raise UpstreamBadContent(f"upstream {self.name}: {exc.message}") from None
        algorithm = reference.split(":", 1)[0] if is_digest(reference) else "sha256"
        digest = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if media_type == DOCKER_SCHEMA1_SIGNED:
            # Its digest is over the payload without signatures (and registries that
            # convert to schema1 sign anew on every GET, so the bytes vary).
            digest = schema1_digest(data) or digest
        if is_digest(reference) and digest != reference:
            raise UpstreamBadContent(f"upstream {self.name}: manifest {reference} hashed to {digest}")
        if (header_digest and header_digest.startswith(f"{algorithm}:")
                and header_digest != digest and media_type not in SCHEMA1_TYPES):
            raise UpstreamBadContent(f"upstream {self.name}: manifest for {reference} hashed to "
                                     f"{digest}, upstream said {header_digest[:80]}")
        return Manifest(data, media_type, digest), refs

    async def head_manifest(self, repository: str, reference: str, accept: list[str],
                            fallback: bool = False) -> ManifestInfo | None:
        """Digest, type and size from a HEAD (free on Docker Hub's pull limit);
        None when upstream does not say the digest."""
        return await self._bounded(fallback, f"manifest {repository}:{reference}",
                                   lambda: self._head_manifest(repository, reference, accept))

    async def _head_manifest(self, repository: str, reference: str,
                             accept: list[str]) -> ManifestInfo | None:
        resp = await self._request("HEAD", self._url(repository, "manifests", reference),
                                   repository, self._accept_headers(accept))
        if resp.status_code != 200:
            raise upstream_errors.error(self.name, resp, b"", "manifest", repository, reference)
        digest = resp.headers.get("docker-content-digest", "")
        media_type = resp.headers.get("content-type", "").split(";", 1)[0].strip()
        size = _number(resp.headers.get("content-length"))
        if not DIGEST_RE.fullmatch(digest) or not media_type or size is None:
            return None
        return ManifestInfo(digest, media_type, size)

    async def stat_blob(self, repository: str, digest: str) -> int:
        resp = await self._request("HEAD", self._url(repository, "blobs", digest), repository, [])
        if resp.status_code != 200:
            raise upstream_errors.error(self.name, resp, b"", "blob", repository, digest)
        size = _number(resp.headers.get("content-length"))
        return -1 if size is None else size

    @asynccontextmanager
    async def stream_blob(self, repository: str, digest: str,
                          offset: int = 0) -> AsyncIterator["BlobStream"]:
        """The upstream body of a blob, from ``offset`` when upstream honours Range
        (``stream.start`` says where the bytes really begin: ``offset`` or 0)."""
        headers = [("Accept-Encoding", "identity")]
        if offset:
            headers.append(("Range", f"bytes={offset}-"))
        on_blob_client = _transfer_client.set(self._blob_client)
        try:
            async with self._stream("GET", self._url(repository, "blobs", digest), repository,
                                    headers, what="blob") as resp:
                yield BlobStream.of(resp, offset, self.name)
        finally:
            _transfer_client.reset(on_blob_client)

    async def tags(self, repository: str, fallback: bool = False) -> list[str]:
        """The whole tag list, following upstream pagination."""
        return await self._bounded(fallback, f"tag list of {repository}",
                                   lambda: self._tags(repository))

    async def _tags(self, repository: str) -> list[str]:
        url = self._url(repository, "tags", "list") + "?n=1000"
        tags: list[str] = []
        for _ in range(TAG_PAGES):
            resp = await self._request("GET", url, repository, [("Accept", "application/json")])
            body = await self._read_limited(resp, 16 * 1024 * 1024)
            if resp.status_code != 200:
                raise upstream_errors.error(self.name, resp, body, "name", repository, "")
            try:
                page = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                raise UpstreamBadContent(f"upstream {self.name}: tag list is not JSON") from None
            tags += [t for t in page if isinstance(t, str) and TAG_RE.fullmatch(t)]
            nxt = _next_link(resp.headers.get("link"))
            if not nxt:
                break
            url = urljoin(url, nxt)
            if origin(url) != self._origin:
                break
        return sorted(set(tags))

    # -- up, down and the revalidation deadline --------------------------------------------

    async def _bounded(self, fallback: bool, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``; when a cached copy can stand in, within ``revalidate_timeout``,
        and not at all while the upstream is down."""
        if not fallback:
            return await call()
        if self._down_since is not None:
            raise UpstreamUnavailable(
                f"upstream {self.name}: down for {time.monotonic() - self._down_since:.0f}s, "
                f"not asked for {what} (probing in the background)",
                detail={"upstream": self.name, "reason": "down"})
        limit = self.config.revalidate_timeout
        try:
            async with asyncio.timeout(limit):
                return await call()
        except TimeoutError:
            self._mark_down(f"no answer within revalidate_timeout {limit:g}s")
            raise UpstreamUnavailable(f"upstream {self.name}: timed out revalidating {what} "
                                      f"(revalidate_timeout {limit:g}s)",
                                      detail={"upstream": self.name, "reason": "timeout"}) from None

    def _mark_down(self, reason: str) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            metrics.upstream_up.labels(self.name).set(0)
            log.warning("upstream %s is down (%s): cached copies are served without asking it "
                        "until a probe of %s/v2/ answers", self.name, reason, self.config.url)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("upstream %s is back after %.1fs", self.name,
                        time.monotonic() - self._down_since)
            self._down_since = None
            metrics.upstream_up.labels(self.name).set(1)

    async def _probe_until_up(self) -> None:
        delay = PROBE_FIRST
        while self._down_since is not None:
            await asyncio.sleep(delay)
            if self._down_since is None:
                return
            request = self._client.build_request("GET", f"{self.config.url}/v2/",
                                                 timeout=self.config.revalidate_timeout)
            try:
                resp = await self._client.send(request)
            except httpx.TransportError as exc:
                log.info("upstream %s still down: %s", self.name,
                         upstream_errors.unavailable(self.name, exc, "probing").message)
                delay = min(delay * 2, PROBE_MAX)
                continue
            await resp.aclose()
            self._mark_up()        # any HTTP answer (401 included) means it is there again

    # -- plumbing ------------------------------------------------------------------------

    def _url(self, repository: str, kind: str, reference: str) -> str:
        # repository and reference are validated by models before they get here.
        return f"{self.config.url}/v2/{repository}/{kind}/{reference}"

    @staticmethod
    def _accept_headers(accept: list[str]) -> list[tuple[str, str]]:
        lines = accept or [DEFAULT_ACCEPT]
        return [("Accept", line) for line in lines]

    @asynccontextmanager
    async def _stream(self, method: str, url: str, repository: str, headers,
                      what: str) -> AsyncIterator[httpx.Response]:
        resp = await self._request(method, url, repository, headers, stream=True)
        try:
            if resp.status_code not in (200, 206):
                body = await self._read_limited(resp, ERROR_BODY_MAX)
                raise upstream_errors.error(self.name, resp, body, what, repository,
                                            url.rsplit("/", 1)[-1])
            yield resp
        except httpx.TransportError as exc:
            raise upstream_errors.unavailable(self.name, exc, f"reading {what}") from None
        finally:
            await resp.aclose()

    async def _read_limited(self, resp: httpx.Response, limit: int) -> bytes:
        data = bytearray()
        try:
            async for chunk in resp.aiter_bytes():
                data += chunk
                if len(data) > limit:
                    break
        except httpx.HTTPError:
            pass
        finally:
            await resp.aclose()
        return bytes(data[:limit])

    async def _request(self, method: str, url: str, repository: str, headers,
                       stream: bool = False) -> httpx.Response:
        scope = f"repository:{repository}:pull"
        for attempt in range(2):
            auth = await self._authorization(scope)
            resp = await self._send(method, url, list(headers), auth, stream)
            if resp.status_code != 401 or attempt == 1:
                return resp
            if origin(str(resp.url)) != self._origin:
                # A redirect target (a CDN) asking for credentials: not ours to answer,
                # and its challenge must not replace the upstream's own.
                log.warning("upstream %s: %s answered 401 after a redirect; its challenge is "
                            "ignored (credentials go only to %s)", self.name,
                            origin(str(resp.url))[1], self._origin[1])
                return resp
            challenge = parse_challenge(resp.headers.get("www-authenticate"))
            if challenge is None or (challenge.scheme == "basic" and not self.config.username):
                return resp
            await resp.aclose()
            self._challenge = challenge
            if auth is not None:
                self._tokens.refused(scope, auth)   # others' 401s were not this token's fault
        raise AssertionError("unreachable")

    async def _send(self, method: str, url: str, headers: list, auth: str | None,
                    stream: bool) -> httpx.Response:
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = list(headers)
            if auth and origin(url) == self._origin:
                hdrs.append(("Authorization", auth))
            request = self._client.build_request(method, url, headers=hdrs)
            resp = await self._send_retrying(request, stream)
            location = resp.headers.get("location")
            if resp.status_code in REDIRECTS and location:
                await resp.aclose()
                url = urljoin(url, location)
                if urlsplit(url).scheme not in ("http", "https"):
                    raise UpstreamUnavailable(f"upstream {self.name}: redirect to a non-HTTP URL")
                if resp.status_code == 303:
                    method = "GET"
                continue
            remaining = resp.headers.get("ratelimit-remaining")
            if remaining is not None:
                log.debug("upstream %s ratelimit-remaining %s", self.name, remaining)
                m = re.match(r"\s*([0-9]{1,12})\b", remaining)     # "100;w=21600"
                if m:
                    metrics.upstream_ratelimit_remaining.labels(self.name).set(int(m.group(1)))
            return resp
        raise UpstreamUnavailable(f"upstream {self.name}: too many redirects")

    async def _send_retrying(self, request: httpx.Request, stream: bool) -> httpx.Response:
        """Send one (idempotent: GET or HEAD) request, retrying with backoff when the
        connection cannot be made or upstream answers 500/502/503/504. A read timeout
        is not retried: a hung upstream would only hang the client longer."""
        retries = self.config.retries
        own = origin(str(request.url)) == self._origin
        for attempt in range(retries + 1):
            try:
                resp = await self._timed_send(request, stream)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if attempt == retries:
                    raise self._failed(exc, "connecting", own) from None
            except httpx.TransportError as exc:
                raise self._failed(exc, "waiting for an answer", own) from None
            else:
                if own:
                    self._mark_up()
                if resp.status_code not in RETRY_STATUSES or attempt == retries:
                    return resp
                await resp.aclose()
            delay = RETRY_BACKOFF * (3 ** attempt)
            log.info("upstream %s: retrying %s %s in %.2fs", self.name, request.method,
                     request.url.path, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _failed(self, exc: httpx.TransportError, doing: str, own: bool) -> UpstreamUnavailable:
        error = upstream_errors.unavailable(self.name, exc, doing)
        if own:
            self._mark_down(error.message.removeprefix(f"upstream {self.name}: "))
        return error

    async def _timed_send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        started = time.monotonic()
        status = "error"
        try:
            resp = await (_transfer_client.get() or self._client).send(request, stream=stream)
            status = str(resp.status_code)
            return resp
        finally:
            metrics.upstream_requests.labels(self.name, request.method, status).inc()
            metrics.upstream_seconds.labels(self.name).observe(time.monotonic() - started)

    # -- authentication ------------------------------------------------------------------

    def _basic(self) -> str | None:
        if not self.config.username:
            return None
        raw = f"{self.config.username}:{self.config.password or ''}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def _authorization(self, scope: str) -> str | None:
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        return await self._tokens.get(scope, lambda: self._fetch_token(challenge, scope))

    async def _fetch_token(self, challenge: Challenge, scope: str) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnavailable(f"upstream {self.name}: bad token realm in challenge")
        params = {"scope": scope}
        if challenge.params.get("service"):
            params["service"] = challenge.params["service"]
        headers = []
        basic = self._basic()
        if basic and not realm_allowed(self.config.url, realm, self.config.token_realms):
            log.warning("upstream %s: refusing to send credentials to token realm %s: %s is not "
                        "the upstream's site (list it in upstreams.%s.token_realms to allow it)",
                        self.name, realm[:200], parts.hostname, self.name)
            raise Denied(f"upstream {self.name}: token realm {parts.hostname} is not the "
                         f"upstream's site; credentials not sent (see token_realms)",
                         detail={"upstream": self.name, "realm": realm[:200]})
        # Credentials only travel over TLS (or to a loopback realm, as in tests).
        if basic and (parts.scheme == "https" or is_loopback(parts.hostname)):
            headers.append(("Authorization", basic))
        try:
            request = self._client.build_request("GET", realm, params=params, headers=headers)
            resp = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise upstream_errors.unavailable(self.name, exc, "asking its token service") from None
        body = await self._read_limited(resp, TOKEN_BODY_MAX + 1)
        if resp.status_code in (401, 403):
            raise Denied(f"upstream {self.name}: token service refused "
                         f"{'the configured credentials' if basic else 'anonymous access'}")
        if resp.status_code == 429:
            raise UpstreamRateLimited(f"upstream {self.name}: token service rate limited",
                                      headers=upstream_errors.retry_after(resp))
        if resp.status_code != 200:
            raise UpstreamUnavailable(f"upstream {self.name}: token service answered "
                                      f"{resp.status_code}")
        if len(body) > TOKEN_BODY_MAX:
            raise UpstreamUnavailable(f"upstream {self.name}: token service answered with more "
                                      f"than {TOKEN_BODY_MAX // 1024} KiB")
        try:
            body = json.loads(body)
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamUnavailable(f"upstream {self.name}: token service sent no token") from None
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable(f"upstream {self.name}: token service sent no token")
        return f"Bearer {token}", max(1.0, min(expires_in, 3600) - 15)


@dataclass
class BlobStream:
    start: int                  # offset of the first byte of this body within the blob
    size: int | None            # the whole blob's size, when upstream said it
    _resp: httpx.Response
    _upstream: str

    @classmethod
    def of(cls, resp: httpx.Response, offset: int, upstream: str) -> "BlobStream":
        if resp.status_code == 206:
            m = re.fullmatch(r"bytes ([0-9]{1,18})-([0-9]{1,18})/([0-9]{1,18}|\*)",
                             resp.headers.get("content-range", ""))
            if not m or int(m.group(1)) != offset:
                raise UpstreamUnavailable(f"upstream {upstream}: unusable answer to a Range request")
            return cls(offset, _number(m.group(3)), resp, upstream)
        return cls(0, _number(resp.headers.get("content-length")), resp, upstream)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw body bytes (no content decoding); a broken stream is UpstreamUnavailable."""
        try:
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except httpx.TransportError as exc:
            raise upstream_errors.unavailable(self._upstream, exc, "mid-blob") from None


def _number(value: str | None) -> int | None:
    """A non-negative decimal header value (ASCII digits only), or None."""
    if value and len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


def _next_link(header: str | None) -> str | None:
    if not header:
        return None
    m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', header)
    return m.group(1) if m else None
