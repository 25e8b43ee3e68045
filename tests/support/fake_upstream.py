"""A small registry of our own that behaves as real upstreams do at their edges:
Basic auth on the API, and blob GETs redirected to a separate "CDN" origin.

``FakeUpstream(files)`` serves ``files`` ({digest: bytes}, manifests and blobs)
for repository ``fake/repo``; tag ``latest`` points at ``manifest_digest``.
``.api`` and ``.cdn`` are ServerThreads; ``.cdn_headers`` and ``.api_headers``
record every request's headers, so tests can see where credentials went.
"""

from __future__ import annotations

import base64

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from .server_thread import ServerThread

REPO = "fake/repo"


class FakeUpstream:
    def __init__(self, blobs: dict[str, bytes], manifest: bytes, manifest_type: str,
                 manifest_digest: str, user: str = "bob", password: str = "hunter2",
                 blob_head_size: bool = True) -> None:
        self.blobs = blobs
        self.blob_head_size = blob_head_size     # False: blob HEADs carry no Content-Length
        self.manifest, self.manifest_type = manifest, manifest_type
        self.manifest_digest = manifest_digest
        self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.api_headers: list[dict] = []
        self.cdn_headers: list[dict] = []
        self.cdn = ServerThread(Starlette(routes=[Route("/data/{digest}", self._cdn_blob)]), "cdn")
        self.api = ServerThread(Starlette(routes=[
            Route("/v2/", self._base, methods=["GET"]),
            Route("/v2/fake/repo/manifests/{ref}", self._manifest, methods=["GET", "HEAD"]),
            Route("/v2/fake/repo/blobs/{digest}", self._blob, methods=["GET", "HEAD"]),
        ]), "fake-upstream")

    def start(self) -> FakeUpstream:
        self.cdn.start()
        self.api.start()
        return self

    def stop(self) -> None:
        self.api.stop()
        self.cdn.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _denied(self, request: Request) -> Response | None:
        self.api_headers.append(dict(request.headers))
        if request.headers.get("authorization") != self.auth:
            return JSONResponse({"errors": [{"code": "UNAUTHORIZED", "message": "login"}]},
                                status_code=401,
                                headers={"WWW-Authenticate": 'Basic realm="fake"'})
        return None

    async def _base(self, request: Request) -> Response:
        return self._denied(request) or JSONResponse({})

    async def _manifest(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        ref = request.path_params["ref"]
        if ref not in ("latest", self.manifest_digest):
            return JSONResponse({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no"}]}, 404)
        return Response(self.manifest, media_type=self.manifest_type,
                        headers={"Docker-Content-Digest": self.manifest_digest})

    async def _blob(self, request: Request) -> Response:
        if denied := self._denied(request):
            return denied
        digest = request.path_params["digest"]
        if digest not in self.blobs:
            return JSONResponse({"errors": [{"code": "BLOB_UNKNOWN", "message": "no"}]}, 404)
        if request.method == "HEAD":
            if not self.blob_head_size:
                return _NoLengthHead()
            return Response(headers={"Content-Length": str(len(self.blobs[digest]))})
        return RedirectResponse(f"{self.cdn.url}/data/{digest}", status_code=307)

    async def _cdn_blob(self, request: Request) -> Response:
        self.cdn_headers.append(dict(request.headers))
        return Response(self.blobs[request.path_params["digest"]],
                        media_type="application/octet-stream")


class _NoLengthHead(Response):
    """A 200 HEAD answer without Content-Length (Starlette would add one of 0)."""

    def __init__(self) -> None:
        self.status_code = 200
        self.body = b""
        self.background = None
        self.raw_headers = [(b"content-type", b"application/octet-stream")]
