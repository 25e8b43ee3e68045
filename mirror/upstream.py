"""Upstream: the one place that talks to an upstream registry.

Two ``httpx.AsyncClient``s per upstream: blob bodies (``stream_blob``, with its
redirects and retries) go through one sized to ``max_fills``, everything else
(manifests, HEADs, tags, tokens) through the other, so downloads can never take
the connections a manifest needs. Requests go out anonymously until the
upstream answers 401 with a challenge; then Basic credentials or a Bearer token
(fetched from the challenge's realm, cached per scope until shortly before it
expires) are added and the request is retried once. Redirects are followed by
hand so ``Authorization`` is only ever sent to the upstream's own origin.
Upstream failures become ``RegistryError``s in ``_error`` and nowhere else.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import ipaddress
import json
import logging
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator
from urllib.parse import urljoin, urlsplit

import httpcore
import httpx

from . import __version__, metrics
from .config import UpstreamConfig
from .errors import (BY_CODE, BlobUnknown, Denied, ManifestUnknown, NameUnknown, RegistryError,
                     UpstreamBadContent, UpstreamRateLimited, UpstreamUnavailable)
from .models import (DEFAULT_ACCEPT, DIGEST_RE, DOCKER_SCHEMA1_SIGNED, MANIFEST_MAX,
                     SCHEMA1_TYPES, TAG_RE, Manifest, ManifestInfo, References, is_digest,
                     parse_manifest, schema1_digest)

log = logging.getLogger("mirror.upstream")

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


# The client a request goes out on: set for the span of a blob download, so its
# redirects and retries stay on the blob connections without every layer passing it.
_transfer_client: contextvars.ContextVar[httpx.AsyncClient | None] = contextvars.ContextVar(
    "mirror_upstream_client", default=None)


@dataclass(frozen=True)
class Challenge:
    scheme: str                 # "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str | None) -> Challenge | None:
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): v1 if v1 is not None and q else v2
              for k, q, v1, v2 in ((m.group(1), m.group(2), m.group(3), m.group(4))
                                   for m in re.finditer(r'([A-Za-z_]+)=(?:(")([^"]*)"|([^",\s]*))', rest))}
    scheme = scheme.lower()
    if scheme not in ("bearer", "basic"):
        return None
    return Challenge(scheme, params)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Upstream:
    def __init__(self, config: UpstreamConfig, client: httpx.AsyncClient | None = None) -> None:
        self.config = config
        self.name = config.name
        self._origin = _origin(config.url)
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
        self._tokens: dict[str, tuple[str, float]] = {}      # scope -> (Authorization, expires)
        self._token_locks: dict[str, asyncio.Lock] = {}

    async def aclose(self) -> None:
        await self._client.aclose()
        if self._blob_client is not self._client:
            await self._blob_client.aclose()

    # -- the read API --------------------------------------------------------------------

    async def get_manifest(self, repository: str, reference: str,
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

    async def head_manifest(self, repository: str, reference: str,
                            accept: list[str]) -> ManifestInfo | None:
        """Digest, type and size from a HEAD (free on Docker Hub's pull limit);
        None when upstream does not say the digest."""
        resp = await self._request("HEAD", self._url(repository, "manifests", reference),
                                   repository, self._accept_headers(accept))
        if resp.status_code != 200:
            raise self._error(resp, b"", "manifest", repository, reference)
        digest = resp.headers.get("docker-content-digest", "")
        media_type = resp.headers.get("content-type", "").split(";", 1)[0].strip()
        size = _number(resp.headers.get("content-length"))
        if not DIGEST_RE.fullmatch(digest) or not media_type or size is None:
            return None
        return ManifestInfo(digest, media_type, size)

    async def stat_blob(self, repository: str, digest: str) -> int:
        resp = await self._request("HEAD", self._url(repository, "blobs", digest), repository, [])
        if resp.status_code != 200:
            raise self._error(resp, b"", "blob", repository, digest)
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

    async def tags(self, repository: str) -> list[str]:
        """The whole tag list, following upstream pagination."""
        url = self._url(repository, "tags", "list") + "?n=1000"
        tags: list[str] = []
        for _ in range(TAG_PAGES):
            resp = await self._request("GET", url, repository, [("Accept", "application/json")])
            body = await self._read_limited(resp, 16 * 1024 * 1024)
            if resp.status_code != 200:
                raise self._error(resp, body, "name", repository, "")
            try:
                page = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                raise UpstreamBadContent(f"upstream {self.name}: tag list is not JSON") from None
            tags += [t for t in page if isinstance(t, str) and TAG_RE.fullmatch(t)]
            nxt = _next_link(resp.headers.get("link"))
            if not nxt:
                break
            url = urljoin(url, nxt)
            if _origin(url) != self._origin:
                break
        return sorted(set(tags))

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
                raise self._error(resp, body, what, repository, url.rsplit("/", 1)[-1])
            yield resp
        except httpx.TransportError as exc:
            raise _unavailable(self.name, exc, f"reading {what}") from None
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
            challenge = parse_challenge(resp.headers.get("www-authenticate"))
            if challenge is None or (challenge.scheme == "basic" and not self.config.username):
                return resp
            await resp.aclose()
            self._challenge = challenge
            if auth is not None and self._tokens.get(scope, (None,))[0] == auth:
                del self._tokens[scope]     # this token was refused; others' 401s were not its fault
        raise AssertionError("unreachable")

    async def _send(self, method: str, url: str, headers: list, auth: str | None,
                    stream: bool) -> httpx.Response:
        for _ in range(MAX_REDIRECTS + 1):
            hdrs = list(headers)
            if auth and _origin(url) == self._origin:
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
            return resp
        raise UpstreamUnavailable(f"upstream {self.name}: too many redirects")

    async def _send_retrying(self, request: httpx.Request, stream: bool) -> httpx.Response:
        """Send one (idempotent: GET or HEAD) request, retrying with backoff when the
        connection cannot be made or upstream answers 500/502/503/504. A read timeout
        is not retried: a hung upstream would only hang the client longer."""
        retries = self.config.retries
        for attempt in range(retries + 1):
            try:
                resp = await self._timed_send(request, stream)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError) as exc:
                if attempt == retries:
                    raise _unavailable(self.name, exc, "connecting") from None
            except httpx.TransportError as exc:
                raise _unavailable(self.name, exc, "waiting for an answer") from None
            else:
                if resp.status_code not in RETRY_STATUSES or attempt == retries:
                    return resp
                await resp.aclose()
            delay = RETRY_BACKOFF * (3 ** attempt)
            log.info("upstream %s: retrying %s %s in %.2fs", self.name, request.method,
                     request.url.path, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
        cached = self._tokens.get(scope)
        if cached and cached[1] > time.monotonic():
            return cached[0]
        lock = self._token_locks.setdefault(scope, asyncio.Lock())
        async with lock:        # one token fetch per scope, however many requests wait
            cached = self._tokens.get(scope)
            if cached and cached[1] > time.monotonic():
                return cached[0]
            value, ttl = await self._fetch_token(challenge, scope)
            self._tokens[scope] = (value, time.monotonic() + ttl)
            return value

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
        # Credentials only travel over TLS (or to a loopback realm, as in tests).
        if basic and (parts.scheme == "https" or _is_loopback(parts.hostname)):
            headers.append(("Authorization", basic))
        try:
            resp = await self._client.get(realm, params=params, headers=headers)
        except httpx.TransportError as exc:
            raise _unavailable(self.name, exc, "asking its token service") from None
        if resp.status_code in (401, 403):
            raise Denied(f"upstream {self.name}: token service refused "
                         f"{'the configured credentials' if basic else 'anonymous access'}")
        if resp.status_code == 429:
            raise UpstreamRateLimited(f"upstream {self.name}: token service rate limited",
                                      headers=_retry_after(resp))
        if resp.status_code != 200:
            raise UpstreamUnavailable(f"upstream {self.name}: token service answered "
                                      f"{resp.status_code}")
        try:
            body = resp.json()
            token = body.get("token") or body.get("access_token")
            expires_in = float(body.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError):
            raise UpstreamUnavailable(f"upstream {self.name}: token service sent no token") from None
        if not isinstance(token, str) or not token:
            raise UpstreamUnavailable(f"upstream {self.name}: token service sent no token")
        return f"Bearer {token}", max(1.0, min(expires_in, 3600) - 15)

    # -- the one error mapping -------------------------------------------------------------

    def _error(self, resp: httpx.Response, body: bytes, what: str, repository: str,
               reference: str) -> RegistryError:
        status = resp.status_code
        code, message = _upstream_error(body)
        where = f"upstream {self.name}"
        detail = {"upstream": self.name, "status": status}
        if status == 429:
            return UpstreamRateLimited(f"{where} rate limit reached: {message or 'too many requests'}",
                                       detail=detail, headers=_retry_after(resp))
        if status >= 500:
            return UpstreamUnavailable(f"{where} answered {status}: {message or resp.reason_phrase}",
                                       detail=detail)
        if status in (401, 403):
            return Denied(f"{where} denied access to {repository} ({message or status}); "
                          "the repository may not exist or need credentials", detail=detail)
        if status == 404:
            cls = BY_CODE.get(code or "") or {"manifest": ManifestUnknown, "blob": BlobUnknown}.get(
                what, NameUnknown)
            return cls(f"{where}: {message or 'not found'}: {repository}"
                       f"{'@' if ':' in reference else ':'}{reference}" if reference else
                       f"{where}: {message or 'not found'}: {repository}", detail=detail)
        cls = BY_CODE.get(code or "")
        if cls is not None:
            return cls(f"{where}: {message}", detail=detail)
        return UpstreamUnavailable(f"{where} answered {status}", detail=detail)


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
            raise _unavailable(self._upstream, exc, "mid-blob") from None


def _number(value: str | None) -> int | None:
    """A non-negative decimal header value (ASCII digits only), or None."""
    if value and len(value) <= 18 and value.isascii() and value.isdigit():
        return int(value)
    return None


def _unavailable(upstream: str, exc: httpx.TransportError, doing: str) -> UpstreamUnavailable:
    """The one mapping of a transport failure (no usable HTTP answer) to an OCI error."""
    if isinstance(exc, httpx.ConnectError):
        what = "could not connect"
    elif isinstance(exc, httpx.TimeoutException):
        what = f"timed out {doing}"
    else:
        what = f"connection broke {doing}"
    return UpstreamUnavailable(f"upstream {upstream}: {what} ({type(exc).__name__})",
                               detail={"upstream": upstream})


def _upstream_error(body: bytes) -> tuple[str | None, str | None]:
    try:
        err = json.loads(body)["errors"][0]
        return str(err.get("code"))[:64], str(err.get("message"))[:300]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None


def _retry_after(resp: httpx.Response) -> dict[str, str]:
    value = resp.headers.get("retry-after", "")
    return {"Retry-After": value} if value and len(value) < 64 else {}


def _next_link(header: str | None) -> str | None:
    if not header:
        return None
    m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', header)
    return m.group(1) if m else None
