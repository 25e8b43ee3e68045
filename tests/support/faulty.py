"""A fault-injecting reverse proxy in front of a real registry.

``FaultyUpstream(target_url)`` forwards every request (method, raw path and
query, headers except Host and hop-by-hop ones, streamed body) to
``target_url`` and streams the answer back (status, headers, raw body bytes)
unless a fault armed with ``arm()`` matches the request (extra keyword arguments
go to the proxy's uvicorn: ``ssl_certfile``/``ssl_keyfile`` make it https)::

    with FaultyUpstream(upstream.url) as proxy:
        fault = proxy.arm("status", path_contains="/manifests/", status=503,
                          headers={"Retry-After": "1"})
        ...  # point the mirror at proxy.url
        assert fault.hits == 1
        assert proxy.count("GET", "/blobs/sha256:") == 1

Faults are tried in the order they were armed; the first one that matches
(``path_contains`` is a substring of the path with query, ``method`` is None
or the method / a collection of methods) and still has ``times`` left (None =
forever) applies, and only that one.  Kinds (``params`` in brackets):

``status``        answer ``status`` with ``{"errors":[{"code": code, "message":
                  message}]}`` (code ``UNKNOWN``, message ``injected``) plus
                  the optional ``headers`` dict; nothing reaches the target.
``reset``         forward, send status and headers (real Content-Length) and
                  the first ``after`` bytes (default: half of Content-Length),
                  then close the connection: the client gets
                  ``httpx.RemoteProtocolError: peer closed connection without
                  sending complete message body (received N bytes, expected
                  M)``.  (Invisible when ``after`` >= the body, or for HEAD.)
``drop``          close the connection without sending a single byte (client:
                  ``RemoteProtocolError: Server disconnected without sending a
                  response``); nothing reaches the target.
``corrupt``       forward, but XOR 0xFF the body byte at ``offset`` (default 0);
                  same length and headers (Docker-Content-Digest included).
``drip``          forward, body in ``chunk``-byte pieces (1024) with ``delay``
                  seconds (0.05) between them.
``hang``          send nothing for ``seconds`` (3600), then forward normally;
                  the client's read timeout fires (``httpx.ReadTimeout``).  A
                  hang whose client went away ends at once; one still waiting
                  at ``stop()`` gets uvicorn's plain 500.
``hang_body``     forward, send headers and ``after`` bytes (0), stall for
                  ``seconds`` (3600), then send the rest.
``redirect``      answer 307 to ``cdn_url``: a second server on its own port
                  which streams the same bytes from the target.  The client's
                  Authorization stays on this side (kept server-side under a
                  random URL token, like a pre-signed URL) so the CDN also
                  works for Basic/token upstreams; ``.cdn_log`` holds the
                  headers the CDN itself received (one dict per request).
``range_ignored`` forward without ``Range``/``If-Range``: the target answers 200
                  with the whole body.
``add_headers``   forward, adding the ``headers`` dict to the response (e.g.
                  Docker Hub's ``ratelimit-remaining``).

``.log`` is a snapshot list of ``LogEntry(method, path, status, fault)``
(``path`` with query; ``status`` None while nothing was sent, e.g. during a
hang; ``fault`` the kind or None), one per request, appended when the request
arrives and given its status just *before* the status line is sent, so a test
that got a response can count it at once: ``.count(method, path_contains,
status=..., fault=...)``.

Forwarding adds ``X-Forwarded-Host``/``-Proto`` (so the registry's absolute
upload Locations point back at the proxy) and adds none of httpx's default
headers; an unreachable target gives a 502 (OCI error body).  The CDN server
is started on the first ``arm("redirect")``.

``stop()`` aborts whatever is still hanging, dripping or streaming.
Connections closed on purpose raise ``_Abort`` into uvicorn, which then closes
the socket; uvicorn's "Exception in ASGI application" log line for those is
filtered out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterable
from typing import NamedTuple

import httpx

from .server_thread import ServerThread

KINDS = ("status", "reset", "drop", "corrupt", "drip", "hang", "hang_body", "redirect",
         "range_ignored", "add_headers")

# Never forwarded in either direction (RFC 9110 7.6.1), plus Host; uvicorn
# adds its own Date, so the target's is dropped rather than duplicated.
_HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
               b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
_REQUEST_DROP = _HOP_BY_HOP | {b"host"}
_RESPONSE_DROP = _HOP_BY_HOP | {b"date"}
_CDN_FORWARD = {b"range", b"if-range", b"accept"}
_POLL = 0.05  # how often sleeps look at stop() and client disconnects
_ANY = object()


class LogEntry(NamedTuple):
    method: str
    path: str  # path with query, as received
    status: int | None  # None: no status line sent (hang, drop, client gone)
    fault: str | None


class Fault:
    """One armed fault; ``hits`` counts the requests it was applied to."""

    def __init__(self, kind: str, path_contains: str, method, times: int | None,
                 params: dict) -> None:
        self.kind = kind
        self.path_contains = path_contains
        if method is None:
            self.methods = None
        elif isinstance(method, str):
            self.methods = frozenset({method.upper()})
        else:
            self.methods = frozenset(m.upper() for m in method)
        self.times = times
        self.params = params
        self.hits = 0

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, method: str, path: str) -> bool:
        return ((self.methods is None or method in self.methods)
                and self.path_contains in path)

    def __repr__(self) -> str:
        return (f"Fault({self.kind!r}, path_contains={self.path_contains!r}, "
                f"methods={self.methods and sorted(self.methods)}, times={self.times}, "
                f"hits={self.hits}, params={self.params!r})")


class _Abort(Exception):
    """Raised into uvicorn to close the client connection on purpose."""


class _ClientGone(Exception):
    """The downstream client disconnected; just stop."""


class _QuietAborts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Abort))


logging.getLogger("uvicorn.error").addFilter(_QuietAborts())


class _Clients:
    """One httpx.AsyncClient per event loop (proxy and CDN run separate loops)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_loop: dict[asyncio.AbstractEventLoop, httpx.AsyncClient] = {}

    def get(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._by_loop.get(loop)
            if client is None:
                client = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10),
                                           follow_redirects=False, trust_env=False)
                self._by_loop[loop] = client
            return client

    def close_all(self, timeout: float = 5) -> None:
        with self._lock:
            items, self._by_loop = list(self._by_loop.items()), {}
        for loop, client in items:
            if loop.is_running():
                try:
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout)
                except Exception:  # noqa: BLE001 - best effort at teardown
                    pass


class _Exchange:
    """One request/response on the ASGI side: body pump, disconnect, sleeps."""

    def __init__(self, scope, receive, send, stopping: threading.Event, on_status) -> None:
        self.scope, self._receive, self._send = scope, receive, send
        self.stopping = stopping
        self.on_status = on_status
        self.disconnected = asyncio.Event()
        self.started = False
        # Bounded: a request body is pulled only as fast as it is forwarded.
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=8)
        self._pump = asyncio.ensure_future(self._run_pump())

    async def _run_pump(self) -> None:
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                await self._queue.put(message)
                return
            await self._queue.put(message)

    async def close(self) -> None:
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.scope["headers"]:
            if key == name:
                return value
        return None

    def has_body(self) -> bool:
        length = self.header(b"content-length")
        return (length is not None and length.strip() not in (b"", b"0")) or \
            self.header(b"transfer-encoding") is not None

    async def body_chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._queue.get()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return

    def check(self) -> None:
        if self.stopping.is_set():
            raise _Abort("server stopping")
        if self.disconnected.is_set():
            raise _ClientGone

    async def pause(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            self.check()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(_POLL, remaining))

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.check()
        self.on_status(status)
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool = True) -> None:
        self.check()
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def respond(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        raw = [(b"content-length", str(len(body)).encode())]
        raw += [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                for k, v in (headers or {}).items() if k.lower() != "content-length"]
        await self.start(status, raw)
        await self.body(body, more=False)

    async def drop(self) -> None:
        """Close the connection before any byte of a response.  ASGI has no
        way to say so; uvicorn marks the response started *before*
        validating header values and writing, so an invalid value makes it
        raise with nothing written, and it then closes the transport."""
        try:
            await self._send({"type": "http.response.start", "status": 500,
                              "headers": [(b"x-drop", b"\n")]})
        except RuntimeError:
            raise _Abort("drop") from None
        raise RuntimeError("uvicorn accepted an invalid header value; 'drop' needs a new trick")


async def _rechunk(pieces: AsyncIterator[bytes], size: int) -> AsyncIterator[bytes]:
    buf = bytearray()
    async for piece in pieces:
        buf += piece
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


class FaultyUpstream:
    """Reverse proxy to ``target_url`` with armable faults (see module doc)."""

    def __init__(self, target_url: str, name: str = "faulty-upstream",
                 **uvicorn_options) -> None:
        self.target_url = target_url.rstrip("/")
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._log: list[LogEntry] = []
        self._cdn_log: list[dict] = []
        self._grants: dict[str, tuple[str, bytes | None]] = {}
        self._active = 0
        self._stopping = threading.Event()
        self._cdn_started = False
        self._clients = _Clients()
        # uvicorn_options (ssl_certfile/ssl_keyfile: https) apply to the proxy, not the CDN.
        self.server = ServerThread(_asgi3(self._proxy_app), name, **uvicorn_options)
        self.cdn = ServerThread(_asgi3(self._cdn_app), f"{name}-cdn")

    # -- lifecycle -----------------------------------------------------------
    @property
    def url(self) -> str:
        return self.server.url

    @property
    def host(self) -> str:
        return self.server.host

    @property
    def cdn_url(self) -> str:
        return self.cdn.url

    def start(self) -> FaultyUpstream:
        self._stopping.clear()
        self.server.start()
        if any(f.kind == "redirect" for f in self.faults):
            self._start_cdn()
        return self

    def _start_cdn(self) -> None:
        """The CDN runs only once a redirect was armed (saves a server per test)."""
        with self._lock:
            start, self._cdn_started = not self._cdn_started, True
        if start:
            self.cdn.start()

    def stop(self) -> None:
        """Abort hanging/streaming requests, then stop both servers."""
        self._stopping.set()
        deadline = time.monotonic() + 5
        while self._active and time.monotonic() < deadline:
            time.sleep(0.01)
        self._clients.close_all()
        # uvicorn needs ~0.15 s to wind down; stop the two side by side
        servers = [self.server] + ([self.cdn] if self._cdn_started else [])
        threads = [threading.Thread(target=s.stop) for s in servers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._cdn_started = False

    def __enter__(self) -> FaultyUpstream:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- faults --------------------------------------------------------------
    def arm(self, fault: str, path_contains: str = "", method: str | Iterable[str] | None = None,
            times: int | None = 1, **params) -> Fault:
        if fault not in KINDS:
            raise ValueError(f"unknown fault {fault!r}; one of {KINDS}")
        if fault == "status" and "status" not in params:
            raise ValueError("fault 'status' needs status=...")
        if times is not None and times < 0:
            raise ValueError("times must be None or >= 0")
        armed = Fault(fault, path_contains, method, times, params)
        if fault == "redirect":
            self._start_cdn()
        with self._lock:
            self._faults.append(armed)
        return armed

    def disarm(self, fault: Fault) -> None:
        with self._lock:
            self._faults = [f for f in self._faults if f is not fault]

    def clear(self) -> None:
        """Remove all faults (the log is kept)."""
        with self._lock:
            self._faults = []

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def _pick(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if not fault.exhausted and fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    # -- logs ----------------------------------------------------------------
    @property
    def log(self) -> list[LogEntry]:
        with self._lock:
            return list(self._log)

    @property
    def cdn_log(self) -> list[dict]:
        with self._lock:
            return list(self._cdn_log)

    def count(self, method: str | None = None, path_contains: str = "",
              status: int | None = None, fault=_ANY) -> int:
        """Requests seen matching method (None = any), path substring, status
        (None = any) and fault kind (default any; pass None for unfaulted)."""
        return sum(1 for e in self.log
                   if (method is None or e.method == method.upper())
                   and path_contains in e.path
                   and (status is None or e.status == status)
                   and (fault is _ANY or e.fault == fault))

    def _log_append(self, method: str, path: str, fault: Fault | None):
        with self._lock:
            index = len(self._log)
            self._log.append(LogEntry(method, path, None, fault.kind if fault else None))

        def set_status(status: int) -> None:
            with self._lock:
                self._log[index] = self._log[index]._replace(status=status)
        return set_status

    # -- the proxy -----------------------------------------------------------
    async def _proxy_app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        method = scope["method"]
        path = _path_with_query(scope)
        fault = self._pick(method, path)
        set_status = self._log_append(method, path, fault)
        await self._serve(scope, receive, send, set_status, self._proxy, fault, path)

    async def _serve(self, scope, receive, send, set_status, handler, *args) -> None:
        with self._lock:
            self._active += 1
        ex = _Exchange(scope, receive, send, self._stopping, set_status)
        try:
            await handler(ex, *args)
        except _ClientGone:
            pass
        except httpx.HTTPError as exc:  # target unreachable / broke mid-body
            if ex.started:
                raise _Abort(f"target: {exc!r}") from exc
            if not ex.disconnected.is_set():
                await ex.respond(502, _error_body("UNKNOWN", f"faulty-upstream: {exc!r}"),
                                 {"content-type": "application/json"})
        finally:
            await ex.close()
            with self._lock:
                self._active -= 1

    async def _proxy(self, ex: _Exchange, fault: Fault | None, path: str) -> None:
        kind = fault.kind if fault else None
        p = fault.params if fault else {}
        if kind == "status":
            headers = {"content-type": "application/json", **p.get("headers", {})}
            body = _error_body(p.get("code", "UNKNOWN"), p.get("message", "injected"))
            await ex.respond(int(p["status"]), body, headers)
            return
        if kind == "drop":
            await ex.drop()
        if kind == "redirect":
            token = secrets.token_urlsafe(16)
            with self._lock:
                self._grants[token] = (path, ex.header(b"authorization"))
            await ex.respond(307, b"", {"location": f"{self.cdn.url}/cdn/{token}{path}"})
            return
        if kind == "hang":
            await ex.pause(float(p.get("seconds", 3600)))

        skip = _REQUEST_DROP | ({b"range", b"if-range"} if kind == "range_ignored" else set())
        headers = [(k, v) for k, v in ex.scope["headers"] if k not in skip]
        if ex.header(b"x-forwarded-host") is None and ex.header(b"host") is not None:
            # so the target's absolute Locations (uploads) point back here
            headers += [(b"x-forwarded-host", ex.header(b"host")),
                        (b"x-forwarded-proto", b"http")]
        content = ex.body_chunks() if ex.has_body() else None
        await self._forward(ex, ex.scope["method"], path, headers, content, kind, p)

    async def _forward(self, ex: _Exchange, method: str, path: str, headers, content,
                       kind: str | None, p: dict) -> None:
        client = self._clients.get()
        request = client.build_request(method, self.target_url + path, headers=headers,
                                       content=content)
        sent_names = {k for k, _ in headers}
        for name in ("accept", "accept-encoding", "user-agent", "connection"):
            if name.encode() not in sent_names:  # httpx client defaults
                request.headers.pop(name, None)
        response = await client.send(request, stream=True)
        try:
            await self._relay(ex, response, kind, p)
        finally:
            await response.aclose()

    async def _relay(self, ex: _Exchange, response: httpx.Response, kind: str | None,
                     p: dict) -> None:
        out = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in _RESPONSE_DROP]
        if kind == "add_headers":
            out += [(k.lower().encode("latin-1"), str(v).encode("latin-1"))
                    for k, v in p.get("headers", {}).items()]
        await ex.start(response.status_code, out)

        cut = None  # reset / hang_body: act after this many body bytes
        if kind == "reset":
            cut = p.get("after")
            if cut is None:
                length = response.headers.get("content-length")
                cut = int(length) // 2 if length else 0
        elif kind == "hang_body":
            cut = int(p.get("after", 0))
        offset = int(p.get("offset", 0)) if kind == "corrupt" else None

        pieces = response.aiter_raw()
        if kind == "drip":
            pieces = _rechunk(pieces, int(p.get("chunk", 1024)))
        sent = 0
        async for piece in pieces:
            if cut is not None and sent + len(piece) >= cut:
                head, piece = piece[:cut - sent], piece[cut - sent:]
                if head:
                    await ex.body(head)
                    sent += len(head)
                await self._at_cut(ex, kind, p)
                cut = None
                if not piece:
                    continue
            if offset is not None and sent <= offset < sent + len(piece):
                flipped = bytearray(piece)
                flipped[offset - sent] ^= 0xFF
                piece = bytes(flipped)
            if kind == "drip" and sent:
                await ex.pause(float(p.get("delay", 0.05)))
            await ex.body(piece)
            sent += len(piece)
        if cut is not None:  # body shorter than the cut point
            await self._at_cut(ex, kind, p)
        await ex.body(b"", more=False)

    @staticmethod
    async def _at_cut(ex: _Exchange, kind: str, p: dict) -> None:
        if kind == "reset":
            raise _Abort("reset")
        await ex.pause(float(p.get("seconds", 3600)))  # hang_body

    # -- the "CDN" -------------------------------------------------------------
    async def _cdn_app(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        with self._lock:
            self._cdn_log.append({k.decode("latin-1"): v.decode("latin-1")
                                  for k, v in scope["headers"]})
        await self._serve(scope, receive, send, lambda status: None, self._cdn)

    async def _cdn(self, ex: _Exchange) -> None:
        path = _path_with_query(ex.scope)
        token, _, target_path = path.removeprefix("/cdn/").partition("/")
        with self._lock:
            grant = self._grants.get(token)
        if not path.startswith("/cdn/") or grant is None:
            await ex.respond(403, b"<Error><Code>AccessDenied</Code></Error>",
                             {"content-type": "application/xml"})
            return
        target_path, authorization = grant
        headers = [(k, v) for k, v in ex.scope["headers"] if k in _CDN_FORWARD]
        if authorization is not None:
            headers.append((b"authorization", authorization))
        await self._forward(ex, ex.scope["method"], target_path, headers, None, None, {})


def _asgi3(method):
    """uvicorn takes a bound method for an ASGI2 app (it only checks plain
    functions and ``__call__`` for coroutine-ness); hand it a function."""
    async def app(scope, receive, send) -> None:
        await method(scope, receive, send)
    return app


def _path_with_query(scope) -> str:
    path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string") or b""
    return (path + (b"?" + query if query else b"")).decode("latin-1")


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()
