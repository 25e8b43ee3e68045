"""Hosted uploads whose requests reach different replicas (Harbor #23926).

An upload session's bytes live in the data directory of the replica that started it
(hosted/uploads.py). Each session started in a site is recorded in PostgreSQL,
``peer_uploads(id, peer_url, at)``, with its owner's peer URL. A ``PATCH``, ``PUT``,
``GET`` or ``DELETE`` of a session that reaches another replica is, once that replica
has authorized the client as for any push, forwarded to the owner over the peer
channel: ``/_mirror/peer/v2/<name>/blobs/uploads/<uuid>`` with the same method, query,
body (streamed, never buffered) and the headers that describe it, signed with the
site's secret (peer_auth.py, over method, path and query). The owner runs the same
route with the client taken as authorized, and its answer (status and headers; the
bodies are empty) goes back as it is: ``Location`` is relative, so the client's next
request goes to the load balancer again, and whichever replica it reaches forwards it.

hosted/routes.py calls ``started`` and ``forward`` through ``app.state.peer_uploads``
(None outside a site). A row goes when a forwarded ``PUT`` or ``DELETE`` ends its
session, else ``KEEP`` seconds after the session started.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..api import GATE
from ..errors import CacheUnavailable
from ..hosted import routes as hosted_routes
from ..hosted.uploads import UUID_RE
from . import schema
from .peer_auth import HEADER
from .peer_site import PEER_PREFIX, Site

log = logging.getLogger("mirror.cluster")

COMPONENT = "peer_uploads"
KEEP = 7 * 86400.0
# the owner may take a while to answer a PUT: it verifies and stores the whole blob
FORWARD_TIMEOUT = httpx.Timeout(10.0, read=300.0)
PREFIX = f"{PEER_PREFIX}/v2/"
_SESSION = re.compile(r"(.+)/blobs/uploads/([^/]+)")
# what describes a request's body and what the route reads; never Authorization/Cookie
_FORWARD = ("content-type", "content-length", "content-range")
_ANSWER = ("location", "range", "docker-upload-uuid", "oci-chunk-min-length",
           "docker-content-digest", "content-type", "www-authenticate")

MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE peer_uploads (
            id       text PRIMARY KEY,
            peer_url text NOT NULL,
            at       timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX peer_uploads_at ON peer_uploads (at)",
    ],
]


async def migrate(conn: Any) -> int:
    return await schema.apply(conn, COMPONENT, MIGRATIONS)


def signed_target(path: str, query: str) -> str:
    """What a forwarded request's signature covers: its path and query."""
    return f"{path}?{query}" if query else path


class UploadPeers:
    def __init__(self, site: Site) -> None:
        self.site = site

    async def started(self, upload_id: str) -> None:
        """Record that this replica holds the session ``upload_id``."""
        async with self.site.pool.acquire() as conn:
            await conn.execute("INSERT INTO peer_uploads (id, peer_url) VALUES ($1, $2) "
                               "ON CONFLICT (id) DO UPDATE SET peer_url = EXCLUDED.peer_url",
                               upload_id, self.site.url)
            await conn.execute("DELETE FROM peer_uploads WHERE at < now() - "
                               "make_interval(secs => $1)", KEEP)

    async def _forget(self, upload_id: str) -> None:
        try:
            async with self.site.pool.acquire() as conn:
                await conn.execute("DELETE FROM peer_uploads WHERE id = $1", upload_id)
        except Exception as exc:          # pruned after KEEP anyway
            log.warning("upload %s: could not forget its replica: %r", upload_id, exc)

    async def owner(self, upload_id: str) -> str | None:
        async with self.site.pool.acquire() as conn:
            url = await conn.fetchval("SELECT peer_url FROM peer_uploads WHERE id = $1",
                                      upload_id)
        return None if url is None else str(url)

    async def forward(self, request: Request, name: str, upload_id: str) -> Response | None:
        """The owner's answer to this request on session ``upload_id``; None when the
        session is this replica's (or unknown to the site: the route says 404), or the
        request was forwarded here already."""
        if HEADER.lower() in request.headers or not UUID_RE.fullmatch(upload_id):
            return None
        owner = await self.owner(upload_id)
        if owner is None or owner == self.site.url:
            return None
        path = f"{PREFIX}{name}/blobs/uploads/{upload_id}"
        query = request.url.query
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARD}
        headers.update(self.site.peer_headers(request.method, signed_target(path, query)))
        body = request.stream() if request.method in ("PATCH", "PUT") else None
        url = owner.rstrip("/") + path + (f"?{query}" if query else "")
        try:
            sent = self.site.http.build_request(request.method, url, headers=headers,
                                                content=body, timeout=FORWARD_TIMEOUT)
            resp = await self.site.http.send(sent)
            try:
                content = await resp.aread()
            finally:
                await resp.aclose()
        except httpx.HTTPError as exc:
            raise CacheUnavailable(f"upload {upload_id} is held by replica {owner}, "
                                      f"which cannot be reached: {type(exc).__name__}") from None
        log.debug("upload %s: %s forwarded to %s: %d", upload_id, request.method, owner,
                  resp.status_code)
        if (request.method, resp.status_code) in (("PUT", 201), ("DELETE", 204)):
            await self._forget(upload_id)            # the session is over
        answer = {k: v for k, v in resp.headers.items() if k.lower() in _ANSWER}
        return Response(content, status_code=resp.status_code, headers=answer)


def _no_mount(request: Request, source: str) -> Any:
    async def none() -> None:
        return None
    return none()


async def _forwarded_authorized(request: Request, name: str, action: str = "pull",
                                pull_also: tuple[str, ...] = ()) -> None:
    """The replica that forwarded the request authorized its client."""
    request.scope["mirror.authorized"] = name


PEER_GATE = hosted_routes.Gate(_forwarded_authorized, GATE.route, _no_mount)


async def upload(request: Request) -> Response:
    peer = getattr(request.app.state, "peer", None)
    raw = request.scope.get("raw_path")
    full = raw.decode("latin-1") if raw else request.url.path
    if peer is None or not peer.site.auth.check(
            request.method, signed_target(full, request.url.query),
            request.headers.get(HEADER)):
        return JSONResponse({"errors": [{"code": "UNAUTHORIZED",
                                         "message": "peer authentication required"}]},
                            status_code=401)
    path = full[len(PREFIX):]
    hosted = request.app.state.registry.hosted
    if hosted is None or not _SESSION.fullmatch(path):
        return JSONResponse({"errors": [{"code": "NOT_FOUND",
                                         "message": "no such upload endpoint"}]},
                            status_code=404)
    return await hosted_routes.write(request, hosted, PEER_GATE, path)


ROUTES = [Route(f"{PREFIX}{{path:path}}", upload, methods=["GET", "PATCH", "PUT", "DELETE"])]
