"""The /v2 HTTP API: parse and validate, call a Source, shape the response.

No httpx and no SQL here. Every ``RegistryError`` becomes OCI error JSON in
``registry_error``; anything else is logged and answered as a 500 in the same
shape.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route as HttpRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from . import metrics
from .auth import Guard, Identity
from .errors import (
    CacheUnavailable,
    ManifestUnknown,
    NotFound,
    PaginationInvalid,
    RangeNotSatisfiable,
    RegistryError,
    Unsupported,
)
from .fill import FillFailed
from .hosted import routes
from .hosted.routes import read_limited
from .hosted.store import HostedStore
from .index import IndexUnavailable
from .models import (
    OCI_INDEX,
    TAG_RE,
    is_digest,
    referrers_index,
    sanitize_accept,
    validate_digest,
    validate_name,
    validate_tag,
)
from .notify import events
from .routing import Route, Router
from .store import BlobBody, Source

log = logging.getLogger("mirror.api")

API_VERSION = (b"docker-distribution-api-version", b"registry/2.0")
PAGE_MAX = 1000
TOKEN_BODY_MAX = 16 * 1024
PAGE_DEFAULT = 100


@dataclass
class Registry:
    """What the routes serve from; built by app.py's lifespan."""

    router: Router
    sources: Mapping[str, Source]
    repositories: Callable[[], Awaitable[list[tuple[str, str]]]]
    not_ready: Callable[[], Awaitable[str | None]]      # None when ready, else why not
    guard: Guard | None = None                          # None: no login required
    hosted: HostedStore | None = None                   # None: no push (405)


# -- responses ----------------------------------------------------------------------------


def error_response(exc: RegistryError, method: str = "GET", path: str = "") -> Response:
    headers = dict(exc.headers)
    if method == "HEAD":
        return Response(status_code=exc.status, headers=headers)
    return JSONResponse(exc.body(_kind(path)), status_code=exc.status, headers=headers)


def _kind(path: str) -> str | None:
    """What a request path is about, for the error code of a failure."""
    if path == "/v2/_catalog":
        return "catalog"
    rest = path[len("/v2/"):] if path.startswith("/v2/") else None
    for kind, pattern in (("manifest", _MANIFEST), ("blob", _BLOB), ("tags", _TAGS)):
        if rest is not None and pattern.fullmatch(rest):
            return kind
    return None


class HeadResponse(Response):
    """A HEAD answer with exactly the headers given: no Content-Length of 0 added
    when the size is not known."""

    def __init__(self, headers: dict[str, str]) -> None:
        self.status_code = 200
        self.body = b""
        self.background = None
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1"))
                            for k, v in headers.items()]


async def _disconnect(receive: Receive) -> None:
    """Returns when the client has gone away."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client went away while its request waited: there is no one to answer."""


async def _unless_gone(receive: Receive, waiting: Awaitable[None]) -> None:
    """Await ``waiting`` unless the client goes away first (then ClientGone): a
    client that leaves while its blob download waits lets go of it at once."""
    task = asyncio.ensure_future(waiting)
    watcher = asyncio.ensure_future(_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    task.result()


ZERO_COPY = "http.response.zerocopysend"     # the ASGI extension (zerocopy.py offers it)
ZERO_COPY_SLICE = 16 * 1024 * 1024             # per message: the access log counts these


class BlobResponse(Response):
    """Streams a BlobBody; stops reading as soon as the client goes away (even while
    waiting for bytes), and aborts the connection (never a short body that looks
    complete) if the source fails. A cached file goes by zero-copy send when the
    server offers it (plain HTTP); a blob being downloaded, or TLS, streams.
    ``sent``: called once the whole body went out (the pull's notification)."""

    def __init__(self, body: BlobBody, status: int, headers: dict[str, str],
                 start: int, end: int | None, sent: Callable[[], None] | None = None) -> None:
        self.status_code = status
        self.blob = body
        self.start, self.end = start, end
        self.on_sent = sent
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
        except BaseException:
            await self.blob.aclose()
            raise
        chunks = self.blob.chunks(self.start, self.end)
        sent = 0
        size = self.blob.size
        # Only a blob that is a file here has a descriptor (fileno) to send from: one in
        # an object store, or being downloaded, streams.
        zero_copy = (ZERO_COPY in (scope.get("extensions") or {})
                     and hasattr(self.blob, "fileno") and size is not None)

        async def pump() -> None:
            nonlocal sent
            if zero_copy and size is not None:     # a cached file: the server sends it
                end = size if self.end is None else self.end
                for pos in range(self.start, end, ZERO_COPY_SLICE):
                    count = min(ZERO_COPY_SLICE, end - pos)
                    await send({"type": ZERO_COPY, "file": self.blob, "offset": pos,
                                "count": count, "more_body": True})
                    sent += count
                await send({"type": "http.response.body", "body": b""})
                return
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent += len(chunk)
            await send({"type": "http.response.body", "body": b""})

        pumping = asyncio.ensure_future(pump())
        watcher = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({pumping, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pumping.done():
                pumping.result()
                if self.on_sent is not None:
                    self.on_sent()
        except (FillFailed, RegistryError, OSError) as exc:
            # Headers are out: the only honest signal left is to break the connection.
            log.warning("aborting response for %s: %s", self.blob.digest, exc)
            raise AbortResponse(str(exc)) from None
        finally:
            watcher.cancel()
            if not pumping.done():          # the client left: stop reading
                pumping.cancel()
                await asyncio.gather(pumping, return_exceptions=True)
            metrics.served(self.blob.source, sent)
            await chunks.aclose()
            await self.blob.aclose()      # in case the iterator never started


class AbortResponse(Exception):
    """Raised out of a started response so the server drops the connection; already
    logged, so the error handlers stay quiet about it."""


def parse_range(header: str | None, size: int | None) -> tuple[int, int] | None:
    """(start, end exclusive) for one ``bytes=`` range; None to serve the whole blob."""
    if not header or size is None:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", header)
    if not m or (not m.group(1) and not m.group(2)):
        return None            # multiple ranges or another unit: the whole blob (RFC 9110)
    first, last = _position(m.group(1)), _position(m.group(2))
    if not m.group(1):         # suffix: the last N bytes
        n = last
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
        return max(0, size - n), size
    start = first
    end = min(last + 1, size) if m.group(2) else size
    if start >= size or (m.group(2) and last < start):
        raise RangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, end


def _position(digits: str) -> int:
    """A byte position from a Range header: leading zeros mean nothing, and anything
    past 18 significant digits is beyond any blob (and past what int() should parse)."""
    digits = digits.lstrip("0")
    if not digits:
        return 0
    return int(digits) if len(digits) <= 18 else 10 ** 18


# -- request parsing ---------------------------------------------------------------------

_MANIFEST = re.compile(r"(.+)/manifests/([^/]+)")
_UPLOADS = re.compile(r"(.+)/blobs/uploads(?:/.*)?")
_BLOB = re.compile(r"(.+)/blobs/([^/]+)")
_TAGS = re.compile(r"(.+)/tags/list")
_REFERRERS = re.compile(r"(.+)/referrers/([^/]+)")


def _registry(request: Request) -> Registry:
    return request.app.state.registry


async def _authorize(request: Request, name: str, action: str = "pull",
                     pull_also: tuple[str, ...] = ()) -> None:
    """Refuse the request unless the client may ``action`` ``name``; before anything
    else looks at it (the route too), so a refused client learns nothing about what is
    cached or which upstreams are configured. ``pull_also``: repositories the request
    would like to read too (a mount's ``from``), named in the challenge's scope."""
    guard = _registry(request).guard
    if guard is not None:
        realm = _realm(request)
        identity = await _known(request, guard)
        guard.check(identity, name, realm, request.query_params.get("ns"), action, pull_also)
    request.scope["mirror.authorized"] = name


def _route(request: Request, name: str) -> tuple[Route, Source]:
    """Where ``name`` goes; only for requests ``_authorize`` let through."""
    registry = _registry(request)
    if request.scope.get("mirror.authorized") != name:
        raise RuntimeError(f"{name!r} routed before the auth check")
    route = registry.router.resolve(name, request.query_params.get("ns"))
    return route, registry.sources[route.upstream]


# host[:port] as a Host header may name this server: DNS labels, IPv4, [IPv6].
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"(?:{_LABEL}(?:\.{_LABEL})*\.?|\[[0-9A-Fa-f:.]{{2,45}}\])(?::[0-9]{{1,5}})?")


def _realm(request: Request) -> str:
    """This server's token endpoint: under ``public_url`` when configured, else as the
    client reached it, if its ``Host`` is a plain host[:port]; else the address the
    connection came in on, so nothing a client sends is echoed unchecked."""
    guard = _registry(request).guard
    if guard is not None and guard.public_url:
        return f"{guard.public_url}/token"
    scheme = request.url.scheme if request.url.scheme in ("http", "https") else "http"
    host = request.headers.get("host", "")
    if not (len(host) <= 261 and _HOST.fullmatch(host)):
        server = request.scope.get("server") or ("127.0.0.1", 80)
        address = f"[{server[0]}]" if ":" in str(server[0]) else str(server[0])
        host = f"{address}:{server[1]}"
    return f"{scheme}://{host}/token"


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


async def _identity(request: Request) -> Identity | None:
    guard = _registry(request).guard
    return None if guard is None else await _known(request, guard)


async def _known(request: Request, guard: Guard) -> Identity:
    """Who sent the request (anonymous: account ""); bad credentials raise."""
    identity = await guard.identify(request.headers.get("authorization"), _realm(request),
                                    _client(request))
    metrics.identified(identity.account)      # the access log's user
    return identity


def _page(request: Request, validate_last) -> tuple[int, str | None]:
    raw_n = request.query_params.get("n")
    n = PAGE_DEFAULT
    if raw_n is not None:
        if not (raw_n.isascii() and raw_n.isdigit()) or len(raw_n) > 9:
            raise PaginationInvalid(f"n must be a non-negative integer, got {raw_n[:20]!r}")
        n = min(int(raw_n), PAGE_MAX)
    last = request.query_params.get("last")
    if last is not None and last != "":
        validate_last(last)
    return n, last or None


def _paginate(items: list[str], n: int, last: str | None) -> tuple[list[str], bool]:
    if last is not None:
        items = [i for i in items if i > last]
    return items[:n], len(items) > n


def _link(path: str, n: int, last: str, extra: dict[str, str]) -> str:
    query = urlencode({**extra, "n": n, "last": last})
    return f'<{path}?{query}>; rel="next"'


def _common_headers(route: Route) -> dict[str, str]:
    return {"OCI-Namespace": route.namespace} if route.namespace else {}


# -- endpoints ---------------------------------------------------------------------------


async def base(request: Request) -> Response:
    """The login probe: with logins configured it challenges anonymous clients, as
    Docker Hub and registry:2 do, so clients send the credentials they have."""
    guard = _registry(request).guard
    if guard is not None:
        guard.check(await _known(request, guard), None, _realm(request))
    return JSONResponse({})


async def token(request: Request) -> Response:
    guard = _registry(request).guard
    if guard is None or guard.tokens is None:
        raise NotFound("token auth is not enabled on this mirror")
    if request.method == "POST":
        # OAuth2 password grant, as containerd sends it when it has credentials.
        body = await read_limited(request, TOKEN_BODY_MAX)
        form = parse_qs(body.decode("latin-1"), max_num_fields=32)
        service: str | None = form["service"][0] if form.get("service") else None
        scopes = [s for v in form.get("scope", []) for s in v.split(" ")]
        user, password = (form.get("username") or [""])[0], (form.get("password") or [""])[0]
        authorization = request.headers.get("authorization")
        if user:
            authorization = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    else:
        service = request.query_params.get("service")
        # One parameter may hold several scopes, space-separated, as a challenge
        # names them (registry:2 and docker_auth read it so too).
        scopes = [s for v in request.query_params.getlist("scope") for s in v.split(" ")]
        authorization = request.headers.get("authorization")
    value, expires_in = await guard.token_for(authorization, service, scopes, _client(request))
    return JSONResponse({"token": value, "access_token": value, "expires_in": expires_in,
                         "issued_at": datetime.now(UTC).isoformat()})


async def metrics_endpoint(request: Request) -> Response:
    return Response(await metrics.scrape(), media_type=metrics.CONTENT_TYPE_LATEST)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


async def readyz(request: Request) -> Response:
    problem = await _registry(request).not_ready()
    if problem:
        return PlainTextResponse(f"not ready: {problem}\n", status_code=503)
    return PlainTextResponse("ready\n")


async def catalog(request: Request) -> Response:
    registry = _registry(request)
    n, last = _page(request, validate_name)
    guard = registry.guard
    identity = None if guard is None else await _known(request, guard)
    if guard is not None and identity is not None:
        guard.check_catalog(identity, _realm(request))
    names = sorted({registry.router.display_name(u, r) for u, r in await registry.repositories()
                    if guard is None or identity is None or guard.may_list(identity, u, r)})
    page, more = _paginate(names, n, last)
    headers = {"Link": _link("/v2/_catalog", n, page[-1], {})} if more and page else {}
    return JSONResponse({"repositories": page}, headers=headers)


async def dispatch(request: Request) -> Response:
    # Parse the path as sent: percent-escapes stay escaped (and so fail the grammar)
    # instead of turning into separators.
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1")[len("/v2/"):] if raw else request.path_params["path"]
    method = request.method
    hosted = _registry(request).hosted
    if hosted is not None and (method not in ("GET", "HEAD") or _UPLOADS.fullmatch(path)):
        return await routes.write(request, hosted, GATE, path)
    if method not in ("GET", "HEAD"):
        raise Unsupported(f"{method} is not supported: this mirror serves pulls only")
    if m := _MANIFEST.fullmatch(path):
        await _authorize(request, m.group(1))
        return await manifest(request, m.group(1), m.group(2))
    if _UPLOADS.fullmatch(path):
        raise Unsupported("pushing is not supported: this mirror serves pulls only")
    if m := _BLOB.fullmatch(path):
        await _authorize(request, m.group(1))
        return await blob(request, m.group(1), m.group(2))
    if m := _TAGS.fullmatch(path):
        await _authorize(request, m.group(1))
        return await tags(request, m.group(1))
    if m := _REFERRERS.fullmatch(path):
        await _authorize(request, m.group(1))
        return await referrers(request, m.group(1), m.group(2))
    raise NotFound(f"no such endpoint: /v2/{path[:200]}")


async def _mount_source(request: Request, source: str) -> tuple[str, str] | None:
    """(upstream, repository) of a mount's ``from`` when the client may pull it."""
    registry = _registry(request)
    try:
        validate_name(source)
        if registry.guard is not None:
            registry.guard.check(await _known(request, registry.guard), source, _realm(request))
        route = registry.router.resolve(source)
    except RegistryError:
        return None
    return route.upstream, route.repository


GATE = routes.Gate(_authorize, lambda request, name: _route(request, name)[0], _mount_source)


async def manifest(request: Request, name: str, reference: str) -> Response:
    validate_name(name)
    if is_digest(reference):
        validate_digest(reference)      # malformed: 400 DIGEST_INVALID
    elif not TAG_RE.fullmatch(reference):
        # Not a tag nor a digest: no such manifest, as distribution answers and the
        # OCI conformance suite expects.
        raise ManifestUnknown(f"manifest unknown: {reference[:200]!r} is not a valid tag or "
                              "digest", detail={"reference": reference[:200]})
    route, source = _route(request, name)
    accept = sanitize_accept(request.headers.getlist("accept"))
    if request.method == "HEAD":
        info = await source.head_manifest(route.repository, reference, accept)
        body, digest, media_type, size = b"", info.digest, info.media_type, info.size
    else:
        m = await source.get_manifest(route.repository, reference, accept)
        body, digest, media_type, size = m.data, m.digest, m.media_type, m.size
        events.pulled(route.upstream, route.repository, digest, media_type, size,
                      "" if is_digest(reference) else reference)
    headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"',
               "Content-Type": media_type, "Content-Length": str(size), **_common_headers(route)}
    return Response(body, headers=headers)


async def blob(request: Request, name: str, digest: str) -> Response:
    validate_name(name)
    validate_digest(digest)
    route, source = _route(request, name)
    headers = {"Docker-Content-Digest": digest, "ETag": f'"{digest}"',
               "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
               **_common_headers(route)}
    if request.method == "HEAD":
        size = await source.stat_blob(route.repository, digest)
        if size >= 0:
            headers["Content-Length"] = str(size)
        return HeadResponse(headers)      # no size known: no Content-Length, never 0
    body = await source.open_blob(route.repository, digest)
    redirect = getattr(body, "redirect_url", None)     # a committed blob in an object store
    if redirect is not None:
        try:
            location = await redirect()
        except BaseException:
            await body.aclose()
            raise
        if location is not None:      # `redirect: true`: the client gets it from the store
            await body.aclose()
            headers.pop("Accept-Ranges", None)
            return Response(status_code=307, headers={**headers, "Location": location})
    try:
        await _unless_gone(request.receive, body.wait_started())
        rng = parse_range(request.headers.get("range"), body.size)
        if rng is not None and body.size is not None and rng[1] < body.size:
            # A download holds back only the blob's last byte until it is verified:
            # a range that stops short of it waits for the verified blob instead.
            await _unless_gone(request.receive, body.wait_verified())
    except ClientGone:
        await body.aclose()
        return Response(status_code=499)       # nginx's "client closed request"; unsent
    except BaseException:
        await body.aclose()
        raise

    def sent() -> None:
        events.pulled_blob(route.upstream, route.repository, digest, body.size)
    if rng is None:
        if body.size is not None:
            headers["Content-Length"] = str(body.size)
        return BlobResponse(body, 200, headers, 0, None, sent)
    start, end = rng
    headers["Content-Length"] = str(end - start)
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{body.size}"
    return BlobResponse(body, 206, headers, start, end, sent)


async def tags(request: Request, name: str) -> Response:
    validate_name(name)
    route, source = _route(request, name)
    n, last = _page(request, validate_tag)
    all_tags = await source.tags(route.repository)
    page, more = _paginate(sorted(all_tags), n, last)
    headers = _common_headers(route)
    if more and page:
        extra = {"ns": route.namespace} if route.namespace else {}
        headers["Link"] = _link(f"/v2/{name}/tags/list", n, page[-1], extra)
    return Response(json.dumps({"name": name, "tags": page}), headers=headers,
                    media_type="application/json")


async def referrers(request: Request, name: str, digest: str) -> Response:
    """OCI v1.1 listing referrers: an image index of the manifests whose subject is
    ``digest`` (unknown: an empty one); ``?artifactType=`` filters, and
    ``OCI-Filters-Applied`` says so."""
    validate_name(name)
    validate_digest(digest)
    route, source = _route(request, name)
    found = await source.referrers(route.repository, digest)
    headers = _common_headers(route)
    wanted = request.query_params.getlist("artifactType")
    if wanted:
        found = [r for r in found if r.artifact_type in wanted]
        headers["OCI-Filters-Applied"] = "artifactType"
    return Response(json.dumps(referrers_index(found)), headers=headers, media_type=OCI_INDEX)


# -- errors ------------------------------------------------------------------------------


async def registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    if exc.status >= 500:
        log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc, request.method, request.url.path)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        err: RegistryError = Unsupported(f"{request.method} is not supported here")
    elif exc.status_code == 404:
        err = NotFound(f"no such endpoint: {request.url.path[:200]}")
    else:
        err = RegistryError(exc.detail)
        err.status = exc.status_code
    return error_response(err, request.method, request.url.path)


async def index_error(request: Request, exc: Exception) -> Response:
    """The index's database failed or is gone (PostgreSQL down, SQLite's disk): a 503
    the client retries, never a 500, and the log says which database."""
    log.warning("%s %s -> 503: the index is unavailable: %s", request.method,
                request.url.path, exc)
    return error_response(CacheUnavailable("the mirror's index is unavailable; retry later"),
                          request.method, request.url.path)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, AbortResponse):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(RegistryError("internal error; see the mirror's log"), request.method,
                          request.url.path)


EXCEPTION_HANDLERS = {RegistryError: registry_error, HTTPException: http_error,
                      IndexUnavailable: index_error, Exception: unexpected_error}

ROUTES = [
    HttpRoute("/metrics", metrics_endpoint, methods=["GET"]),
    HttpRoute("/healthz", healthz, methods=["GET", "HEAD"]),
    HttpRoute("/readyz", readyz, methods=["GET", "HEAD"]),
    HttpRoute("/token", token, methods=["GET", "POST"]),
    HttpRoute("/v2/", base, methods=["GET", "HEAD"]),
    HttpRoute("/v2/_catalog", catalog, methods=["GET", "HEAD"]),
    HttpRoute("/v2/{path:path}", dispatch,
              methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
]


class APIVersionHeader:
    """Adds ``Docker-Distribution-API-Version: registry/2.0`` to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), API_VERSION]
            await send(message)

        await self.app(scope, receive, send_with_header)
