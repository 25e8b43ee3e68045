"""The internal endpoints replicas call on each other, under ``/_mirror/peer`` (never
under /v2, so registry clients never see them).

``GET /_mirror/peer/blobs/<digest>`` (``Range: bytes=N-`` to start at byte N) serves
a blob this replica is downloading right now, as it downloads (a reader of the
process's own fill, or a follower of another worker's claim file: the last byte held
back until the blob is verified, the response aborted if the download fails), or
the blob from this replica's cache; 404 if neither. ``Mirror-Blob-Size`` gives the
whole blob's size.

Every request must carry a valid peer signature (peer_auth.py): without one it is
401 before anything else is looked at, and so are all requests while this replica is
not part of a site.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import fileio
from ..api import BlobResponse
from ..cache import LocalCache
from ..errors import BlobUnknown, RangeNotSatisfiable
from ..fill_follow import ForeignFill
from ..fill_shared import Claim, _flocked, claim_path
from ..models import validate_digest
from .peer_auth import HEADER
from .peer_fill import SIZE_HEADER
from .peer_site import PEER_PREFIX, Site

log = logging.getLogger("mirror.cluster")


@dataclass
class PeerState:
    """What the endpoints need: the site, the cache, and the sources (whose fills
    running in this process they serve)."""
    site: Site
    local: LocalCache
    sources: dict[str, Any]


def _state(request: Request) -> PeerState | None:
    return getattr(request.app.state, "peer", None)


def _unauthorized() -> Response:
    return JSONResponse({"errors": [{"code": "UNAUTHORIZED",
                                     "message": "peer authentication required"}]},
                        status_code=401)


async def blob(request: Request) -> Response:
    state = _state(request)
    if state is None or not state.site.auth.check(request.method, request.url.path,
                                                  request.headers.get(HEADER)):
        return _unauthorized()
    digest = validate_digest(request.path_params["digest"])
    start = _start(request.headers.get("range"))
    body = await _open(state, digest)
    if body is None:
        raise BlobUnknown(f"blob {digest} is neither being downloaded nor cached here")
    try:
        await body.wait_started()
        if body.size is None:             # upstream did not say: the whole blob first
            await body.wait_verified()
        size = body.size
        if size is None or start > size or (start == size and size > 0):
            raise RangeNotSatisfiable(headers={"Content-Range": f"bytes */{size or '*'}"})
    except BaseException:
        await body.aclose()
        raise
    headers = {SIZE_HEADER: str(size), "Content-Type": "application/octet-stream",
               "Content-Length": str(size - start), "Docker-Content-Digest": digest}
    if start:
        headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    return BlobResponse(body, 206 if start else 200, headers, start, None)


def _start(header: str | None) -> int:
    if not header:
        return 0
    m = re.fullmatch(r"\s*bytes\s*=\s*([0-9]{1,18})\s*-\s*", header)
    if m is None:
        raise RangeNotSatisfiable(headers={"Content-Range": "bytes */*"})
    return int(m.group(1))


async def _open(state: PeerState, digest: str) -> Any:
    """A reader of the blob's download in this process, the cached blob, or a reader
    of another worker's download; None if none of these."""
    for source in state.sources.values():
        fill = getattr(source, "_fills", {}).get(digest)
        if fill is not None and fill.joinable:
            return fill.reader()
    local = state.local
    if local.blob_size(digest) is not None or await local.learn_blob(digest):
        cached = await local.open_blob(digest)
        if cached is not None:
            return cached
    claim = await fileio.run(_follow_only, local.data_dir, digest)
    if claim is None:
        return None
    follower = ForeignFill(local, digest, claim)
    reader = follower.reader()
    follower.start()
    return reader


def _follow_only(data_dir: Path, digest: str) -> Claim | None:
    """The claim file of a download another worker process runs, opened to follow;
    None if there is none (never creates or locks one: that would be claiming it)."""
    path = claim_path(data_dir, digest)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    claim = Claim(path, fd, owner=False)
    try:
        held = _flocked()
        running = (os.fstat(fd).st_ino in held) if held is not None else claim.owner_alive()
        header = claim.read()
    except OSError:
        running, header = False, None
    if not running or header is None:
        claim.close()
        return None
    return claim


ROUTES = [Route(f"{PEER_PREFIX}/blobs/{{digest:path}}", blob, methods=["GET"])]
