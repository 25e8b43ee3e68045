"""The blob connections' HTTP: an httpx transport that reads bodies with aiohttp.

httpx reads a body through httpcore, h11 and anyio: several copies and a trip
through each layer per read, about 1.5 CPU-s per GB on this project's machines,
most of a cold blob's cost. aiohttp's C parser hands over the socket's bytes as
they arrive (``iter_any``) at about a third of that. Only the transport changes:
the ``httpx.AsyncClient`` above it, and ``upstream_client`` above that, still
build the requests, follow redirects by hand (so ``Authorization`` stays on the
upstream's origin), retry, authenticate and map errors exactly as before, because
every aiohttp failure is raised here as the ``httpx`` exception httpcore would
have raised for it, with the original (and its OS or TLS cause) chained.

What the httpx default transport would have done, this one does too: the same
``ssl.SSLContext`` (``httpx.create_ssl_context()``: certifi, or ``SSL_CERT_FILE``
/ ``SSL_CERT_DIR``), HTTP/1.1, no content decoding, no cookies of its own, the
request's connect/read/pool timeouts, at most ``max_connections`` connections,
and no retries of its own (``upstream_client`` retries).
When the environment names a proxy, ``usable()`` is false and the caller keeps
httpx's own transport (which honours it) instead.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from yarl import URL

_SKIP_HEADERS = {b"host", b"connection", b"content-length", b"transfer-encoding"}
# Bytes asked of the socket per read, and buffered before reading pauses. asyncio reads
# 256 KiB at a time and aiohttp buffers 64 KiB: 1 MiB measured 0.4 instead of 0.65
# CPU-s/GB (4 MiB was slower again: fresh big buffers cost page faults).
READ_SIZE = 1024 * 1024


def usable() -> bool:
    """False when the environment configures a proxy (httpx honours it; keep httpx)."""
    return not any(scheme in ("http", "https", "all")
                   for scheme in urllib.request.getproxies())


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(self, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max = max_connections
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context()
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        # Made on first use: aiohttp binds its pool to the running event loop.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max, limit_per_host=0, ssl=self._ssl,
                                             enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None),
                read_bufsize=READ_SIZE,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"))
            # aiohttp sends an idempotent request again by itself when the connection
            # breaks; upstream_client does the retrying (``retries``), so it must not.
            if hasattr(self._session, "_retry_connection"):
                self._session._retry_connection = False
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        connect, pool = timeouts.get("connect"), timeouts.get("pool")
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect, sock_read=timeouts.get("read"),
            connect=None if connect is None or pool is None else connect + pool)
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in request.headers.raw if k.lower() not in _SKIP_HEADERS]
        host = request.headers.get("host")
        if host:
            headers.insert(0, ("Host", host))
        body = await request.aread()
        try:
            resp = await self._get_session().request(
                request.method, URL(str(request.url), encoded=True), headers=headers,
                data=body or None, allow_redirects=False, timeout=timeout)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _mapped(exc, request) from exc
        transport = resp.connection.transport if resp.connection is not None else None
        if isinstance(getattr(transport, "max_size", None), int):    # a plain TCP socket
            transport.max_size = READ_SIZE         # type: ignore[union-attr]
        return httpx.Response(
            status_code=resp.status,
            headers=list(resp.raw_headers),
            stream=_Body(resp, request),
            extensions={"http_version": b"HTTP/1.1",
                        "reason_phrase": (resp.reason or "").encode("latin-1", "replace")})

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


class _Body(httpx.AsyncByteStream):
    """The response body as the socket delivers it; failures as httpx's."""

    def __init__(self, resp: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._resp = resp
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _mapped(exc, self._request) from exc

    async def aclose(self) -> None:
        # A body read to its end puts the connection back in the pool; any other is closed.
        if self._resp.content.is_eof():
            self._resp.release()
        else:
            self._resp.close()


def _mapped(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception httpcore raises for the same failure."""
    cls: Any
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        cls = httpx.ConnectTimeout
    elif isinstance(exc, (aiohttp.ServerTimeoutError, TimeoutError)):
        cls = httpx.ReadTimeout
    elif isinstance(exc, aiohttp.ClientConnectorError):      # refused, DNS, TLS handshake
        cls = httpx.ConnectError
    elif isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError,
                          aiohttp.ClientResponseError)):
        cls = httpx.RemoteProtocolError                      # closed early, or not HTTP
    else:                                                    # reset, broken pipe, ...
        cls = httpx.ReadError
    return cls(str(exc) or type(exc).__name__, request=request)
