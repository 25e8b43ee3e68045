"""One line per request, and the HTTP metrics, as an ASGI middleware.

    127.0.0.1:50312 alice "GET /v2/library/alpine/manifests/3.19" 200 1638 0.004s hit \
        "containerd/1.7.2"

(one line; wrapped here).

After the client's address comes the user the request logged in as (``-``:
anonymous, or no logins configured); after the time, what the cache did: hit, miss
(fetched upstream), stale (served while upstream failed), coalesced (joined a fetch
already running) or - (no lookup), with ``@source`` after a miss when it is known
which of the upstream's sources (its url or a mirror, host[:port]) answered it
(``miss@docker.m.daocloud.io``); last, the client's User-Agent. With
``log_format: json`` the same fields are keys of the line's object.
"""

from __future__ import annotations

import logging
import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import metrics
from .notify import events

log = logging.getLogger("mirror.access")

_ROUTES = [
    ("manifest", re.compile(r"/v2/.+/manifests/[^/]+")),
    ("blob", re.compile(r"/v2/.+/blobs/[^/]+")),
    ("tags", re.compile(r"/v2/.+/tags/list")),
    ("catalog", re.compile(r"/v2/_catalog")),
    ("base", re.compile(r"/v2/?")),
    ("metrics", re.compile(r"/metrics")),
    ("health", re.compile(r"/(healthz|readyz)")),
    ("peer", re.compile(r"/_mirror/peer/.*")),      # replicas of a site (cluster/)
]


def route_of(path: str) -> str:
    """A small fixed set of labels, so metrics never grow with request text."""
    for name, pattern in _ROUTES:
        if pattern.fullmatch(path):
            return name
    return "other"


def _printable(text: str) -> str:
    """Request text as it may go in a log line: no control characters, bounded."""
    text = text[:1000]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


class AccessLog:
    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        note = metrics.begin_request()
        events.begin(scope, note)           # for the notifications the request causes
        status = 500          # if the app fails before it answers
        sent = 0

        async def counting_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                metrics.answering()      # other workers' scrapes see what this one learnt
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.zerocopysend":
                sent += message["count"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            elapsed = time.perf_counter() - started
            route = route_of(scope["path"])
            metrics.http_requests.labels(route, scope["method"], str(status)).inc()
            metrics.http_seconds.labels(route).observe(elapsed)
            if self.enabled:
                client = scope.get("client") or ("-", 0)
                raw = scope.get("raw_path") or scope["path"].encode()
                query = scope.get("query_string", b"")
                path = _printable((raw + (b"?" + query if query else b"")).decode("latin-1"))
                agent = _printable(_header(scope, b"user-agent")[:200])
                user = _printable(note.user[:100])
                fields = {"client": f"{client[0]}:{client[1]}", "user": user,
                          "method": scope["method"], "path": path, "status": status,
                          "bytes": sent, "seconds": round(elapsed, 3), "cache": note.cache,
                          "source": note.source, "user_agent": agent}
                cache = note.cache if note.source == "-" else f"{note.cache}@{note.source}"
                log.info('%s:%s %s "%s %s" %d %d %.3fs %s "%s"', client[0], client[1], user,
                         scope["method"], path, status, sent, elapsed, cache,
                         agent.replace('"', '\\"') or "-", extra={"fields": fields})


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return ""
