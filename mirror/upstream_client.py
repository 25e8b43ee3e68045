"""How requests reach an upstream: the HTTP under ``upstream.Upstream``.

Two ``httpx.AsyncClient``s per upstream: blob bodies (``stream_blob``, with its
redirects and retries) go through one sized to ``max_fills``, everything else
(manifests, HEADs, tags, tokens) through the other, so downloads can never take
the connections a manifest needs; the blob client's transport is aiohttp's
(``upstream_transport``: httpx's own reads bodies at three times the CPU), unless
a proxy is configured. Requests go out anonymously until the upstream
answers 401 with a challenge; then Basic credentials or a Bearer token (fetched
from the challenge's realm, cached per scope until shortly before it expires) are
added and the request is retried once. Redirects are followed by hand so
``Authorization`` is only ever sent to the upstream's own origin. Connection
failures and 500/502/503/504 are retried with backoff; every answer from, or
transport failure of, the upstream's own origin marks it up or down in ``health``.
Which realms get credentials, challenge parsing and the token cache are in
``upstream_auth``; failures become errors through ``upstream_errors``.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from . import __version__, metrics, upstream_errors, upstream_status, upstream_transport
from .config import UpstreamConfig
from .errors import Denied, UpstreamRateLimited, UpstreamUnavailable
from .upstream_auth import (
    Challenge,
    TokenCache,
    is_loopback,
    origin,
    parse_challenge,
    realm_allowed,
)
from .upstream_health import Health

log = logging.getLogger("mirror.upstream")
Headers = list[tuple[str, str]]

# httpcore reads the socket 64 KiB at a time, and every read costs a trip through
# h11 and anyio: most of the CPU of a cold blob. 1 MiB reads cut that several times.
if getattr(httpcore.AsyncHTTP11Connection, "READ_NUM_BYTES", None) == 64 * 1024:
    httpcore.AsyncHTTP11Connection.READ_NUM_BYTES = 1024 * 1024

REDIRECTS = {301, 302, 303, 307, 308}
RETRY_STATUSES = {500, 502, 503, 504}
RETRY_BACKOFF = 0.25    # seconds before the first retry; x3 for each one after
MAX_REDIRECTS = 5
ERROR_BODY_MAX = 64 * 1024
TOKEN_BODY_MAX = 64 * 1024  # a token response larger than this is refused
TOKEN_SCOPES_MAX = 2048     # cached tokens (one per repository scope), least recently used go


# The client a request goes out on: set for the span of a blob download, so its
# redirects and retries stay on the blob connections without every layer passing it.
_transfer_client: contextvars.ContextVar[httpx.AsyncClient | None] = contextvars.ContextVar(
    "mirror_upstream_client", default=None)


class UpstreamClient:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient | None = None,
                 mirror: bool = False) -> None:
        self.config = config
        self.name = config.name
        self._origin = origin(config.url)
        self.source = source_label(config.url)    # host[:port]: the per-source metrics label
        self.mirror = mirror                      # one of the upstream's mirrors, not its url
        self.ratelimit_remaining: int | None = None   # the last ratelimit-remaining seen
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=32),
            headers={"User-Agent": f"mirror/{__version__}"},
            follow_redirects=False,
        )
        # One connection per fill slot (proxy.py holds at most max_fills downloads).
        # Their bodies are read with aiohttp (upstream_transport), unless a proxy is set.
        self._blob_client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout),
            limits=httpx.Limits(max_connections=config.max_fills,
                                max_keepalive_connections=config.max_fills),
            headers={"User-Agent": f"mirror/{__version__}"},
            follow_redirects=False,
            transport=(upstream_transport.AiohttpTransport(config.max_fills)
                       if upstream_transport.usable() else None),
        )
        self._challenge: Challenge | None = None
        self.tokens = TokenCache(TOKEN_SCOPES_MAX)
        self.health = Health(config, self._client, self.source)

    async def aclose(self) -> None:
        await self.health.aclose()
        await self._client.aclose()
        if self._blob_client is not self._client:
            await self._blob_client.aclose()

    @asynccontextmanager
    async def stream_blob(self, url: str, repository: str,
                          headers: Headers) -> AsyncIterator[httpx.Response]:
        """A blob's body, on the blob connections (redirects and retries included)."""
        on_blob_client = _transfer_client.set(self._blob_client)
        try:
            async with self.stream("GET", url, repository, headers, what="blob") as resp:
                yield resp
        finally:
            _transfer_client.reset(on_blob_client)

    @asynccontextmanager
    async def stream(self, method: str, url: str, repository: str, headers: Headers,
                     what: str) -> AsyncIterator[httpx.Response]:
        resp = await self.request(method, url, repository, headers, stream=True)
        try:
            if resp.status_code not in (200, 206):
                body = await read_limited(resp, ERROR_BODY_MAX)
                raise upstream_errors.error(self.name, resp, body, what, repository,
                                            url.rsplit("/", 1)[-1])
            yield resp
        except httpx.TransportError as exc:
            raise upstream_errors.unavailable(self.name, exc, f"reading {what}") from None
        finally:
            await resp.aclose()

    async def request(self, method: str, url: str, repository: str, headers: Headers,
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
                self.tokens.refused(scope, auth)   # others' 401s were not this token's fault
        raise AssertionError("unreachable")

    async def _send(self, method: str, url: str, headers: Headers, auth: str | None,
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
                    self.ratelimit_remaining = int(m.group(1))
                    upstream_status.ratelimit(self.name, self.source, self.ratelimit_remaining)
                    metrics.upstream_source_ratelimit_remaining.labels(
                        self.name, self.source).set(self.ratelimit_remaining)
                    if not self.mirror:
                        metrics.upstream_ratelimit_remaining.labels(self.name).set(
                            self.ratelimit_remaining)
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
                    self.health.mark_up()
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
        upstream_status.error(self.name, self.source,
                              error.message.removeprefix(f"upstream {self.name}: "))
        if own:
            self.health.mark_down(error.message.removeprefix(f"upstream {self.name}: "))
        return error

    async def _timed_send(self, request: httpx.Request, stream: bool) -> httpx.Response:
        started = time.monotonic()
        status = "error"
        try:
            resp = await (_transfer_client.get() or self._client).send(request, stream=stream)
            status = str(resp.status_code)
            if resp.status_code >= 500 or resp.status_code == 429:
                upstream_status.error(self.name, self.source,
                                      f"{request.method} {request.url.path}: HTTP {status}")
            else:
                upstream_status.success(self.name, self.source)
            return resp
        finally:
            metrics.upstream_requests.labels(self.name, request.method, status).inc()
            metrics.upstream_source_requests.labels(self.name, self.source,
                                                    _kind(request.url.path)).inc()
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
        return await self.tokens.get(scope, lambda: self._fetch_token(challenge, scope))

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
        body = await read_limited(resp, TOKEN_BODY_MAX + 1)
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
            raise UpstreamUnavailable(
                f"upstream {self.name}: token service sent no token") from None
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable(f"upstream {self.name}: token service sent no token")
        return f"Bearer {token}", max(1.0, min(expires_in, 3600) - 15)


def source_label(url: str) -> str:
    """host[:port] of a source's URL: how logs and metrics name it."""
    return urlsplit(url).netloc.rpartition("@")[2].lower()


def _kind(path: str) -> str:
    for part, kind in (("/manifests/", "manifest"), ("/blobs/", "blob"), ("/tags/", "tags"),
                       ("/referrers/", "referrers")):
        if part in path:
            return kind
    return "other"


async def read_limited(resp: httpx.Response, limit: int) -> bytes:
    """At most ``limit`` bytes of the body (what came before a broken stream), closing it."""
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
