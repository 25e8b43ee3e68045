"""The write routes of hosted repositories: blob uploads, manifest PUT, the
upload-session GET, and DELETE of manifests, tags and blobs (OCI distribution-spec
v1.1 push and content management).

api.py dispatches here every request that is not a plain read (``GET``/``HEAD`` of a
manifest, blob or tag list) when ``hosted`` is configured; it passes a ``Gate``, its
own auth check and router, so this module shapes HTTP and calls ``HostedStore`` and
``Uploads`` only: no SQL, no file I/O.

A ``DELETE`` answers ``202 Accepted``: by digest the manifest leaves the repository with
every tag pointing at it, by tag only the tag goes, a blob is unlinked. The bytes stay
until garbage collection. ``hosted.delete: false`` (the default) answers
``405 UNSUPPORTED`` as registry:2 with ``storage.delete.enabled: false``; so does a
``DELETE`` on a name that routes to an upstream (a mirrored repository is changed with
`mirror rm`, not over the API), naming the upstream.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from ..errors import (
    BlobUploadInvalid,
    Denied,
    DigestInvalid,
    PayloadTooLarge,
    RangeNotSatisfiable,
    Unsupported,
)
from ..models import (
    MANIFEST_MAX,
    is_digest,
    is_name,
    validate_digest,
    validate_name,
    validate_tag,
)
from ..routing import Route
from .store import HostedStore
from .uploads import Session

CHUNK_MIN = 0         # OCI-Chunk-Min-Length: chunks of any size are taken

_MANIFEST = re.compile(r"(.+)/manifests/([^/]+)")
_UPLOADS = re.compile(r"(.+)/blobs/uploads(?:/.*)?")
_UPLOAD_SESSION = re.compile(r"(.+)/blobs/uploads/([^/]+)")
_BLOB = re.compile(r"(.+)/blobs/([^/]+)")


@dataclass(frozen=True)
class Gate:
    """What api.py lends the write routes: its auth check and router."""

    # (request, name, action, names to be read too: a mount's from)
    authorize: Callable[[Request, str, str, tuple[str, ...]], Awaitable[None]]
    route: Callable[[Request, str], Route]                     # only after authorize
    mount_source: Callable[[Request, str], Awaitable[tuple[str, str] | None]]


async def read_limited(request: Request, limit: int) -> bytes:
    """The whole body of a small request (a manifest, a token form); more than ``limit``
    bytes is ``413 SIZE_INVALID``."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body larger than {limit} bytes")
    return bytes(body)


def is_upload(path: str) -> bool:
    return _UPLOADS.fullmatch(path) is not None


async def delete(request: Request, hosted: HostedStore, gate: Gate, path: str) -> Response:
    """``DELETE /v2/<name>/manifests/<digest|tag>`` and ``/v2/<name>/blobs/<digest>``."""
    if m := _MANIFEST.fullmatch(path):
        name, reference, kind = m.group(1), m.group(2), "manifest"
    elif (m := _BLOB.fullmatch(path)) and not _UPLOADS.fullmatch(path):
        name, reference, kind = m.group(1), m.group(2), "blob"
    else:
        raise Unsupported("DELETE is not supported here")
    await gate.authorize(request, name, "delete", ())
    validate_name(name)
    if kind == "blob" or is_digest(reference):
        validate_digest(reference)
    else:
        validate_tag(reference)
    if not hosted.config.delete:
        raise Unsupported("deleting is disabled: hosted.delete is false in the config")
    route = gate.route(request, name)
    if not route.hosted:
        raise Unsupported(f"{name[:200]} is mirrored from upstream {route.upstream}: its "
                          "content is removed with `mirror rm`, not deleted over the API")
    if kind == "blob":
        await hosted.delete_blob(route.repository, reference)
    else:
        await hosted.delete_manifest(route.repository, reference)
    return Response(status_code=202, headers={"Content-Length": "0"})


async def write(request: Request, hosted: HostedStore, gate: Gate, path: str) -> Response:
    """Uploads, manifest PUT and the upload-session GET, for hosted repositories."""
    method = request.method
    if method == "DELETE" and not _UPLOADS.fullmatch(path):
        return await delete(request, hosted, gate, path)
    reference = upload = None
    if m := _UPLOAD_SESSION.fullmatch(path):
        name, upload = m.group(1), m.group(2)
    elif m := _UPLOADS.fullmatch(path):
        name = m.group(1)
    elif m := _MANIFEST.fullmatch(path):
        name, reference = m.group(1), m.group(2)
    else:
        raise Unsupported(f"{method} is not supported here")
    mount, source = request.query_params.get("mount"), request.query_params.get("from")
    # A mount's challenge asks for pull on its source too, so the token a client gets
    # by following it lets the mount happen (201) rather than fall back to an upload.
    reads = (source,) if (source is not None and mount is not None and is_name(source)
                          and upload is None and reference is None and method == "POST") else ()
    await gate.authorize(request, name, "pull" if method == "GET" else "push", reads)
    validate_name(name)
    route = gate.route(request, name)
    if not route.hosted:
        raise Denied(f"{name[:200]} is mirrored from upstream {route.upstream}, which takes "
                     "no pushes here; hosted.repositories in the config names what is hosted")
    repository = route.repository
    if reference is not None:
        if method != "PUT":
            raise Unsupported(f"{method} of manifests is not supported yet")
        if is_digest(reference):
            validate_digest(reference)
        else:
            validate_tag(reference)
        body = await read_limited(request, MANIFEST_MAX)
        pushed = await hosted.put_manifest(repository, reference, body,
                                           request.headers.get("content-type"))
        headers = {"Docker-Content-Digest": pushed.digest,
                   "Location": f"/v2/{name}/manifests/{pushed.digest}"}
        if pushed.subject:
            headers["OCI-Subject"] = pushed.subject
        return Response(status_code=201, headers=headers)
    uploads = hosted.uploads
    peers = getattr(request.app.state, "peer_uploads", None)   # replicas: cluster/
    if upload is None:
        if method != "POST":
            raise Unsupported(f"{method} is not supported on an upload's start")
        if mount is not None and source is not None:
            validate_digest(mount)
            where = await gate.mount_source(request, source)
            if where is not None and await hosted.mount(repository, mount, where) is not None:
                return _blob_created(name, mount)
        digest = request.query_params.get("digest")
        session = await uploads.start(repository)
        if digest is not None:
            validate_digest(digest)
            await uploads.append(session, request.stream())
            await uploads.finish(session, digest)
            return _blob_created(name, digest)
        if peers is not None:
            await peers.started(session.id)
        return _upload_answer(202, name, session)
    if peers is not None:
        forwarded: Response | None = await peers.forward(request, name, upload)
        if forwarded is not None:
            return forwarded                # the session is another replica's
    session = await uploads.get(repository, upload)
    if method == "GET":
        return _upload_answer(204, name, session)
    if method == "DELETE":
        await uploads.cancel(session)
        return Response(status_code=204)
    if method not in ("PATCH", "PUT"):
        raise Unsupported(f"{method} is not supported on an upload")
    async with uploads.lock(session):
        session = await uploads.get(repository, upload)    # as it is now, under the lock
        if method == "PATCH":
            expected = _chunk_range(request.headers.get("content-range"), name, session)
            start = session.offset
            written = await uploads.append(session, request.stream())
            if expected is not None and written != expected:
                await uploads.rollback(session, start)
                raise BlobUploadInvalid(f"Content-Range promised {expected} bytes, got "
                                        f"{written}")
            return _upload_answer(202, name, session)
        digest = request.query_params.get("digest")
        if digest is None:
            raise DigestInvalid("the PUT that closes an upload needs ?digest=")
        validate_digest(digest)
        await uploads.append(session, request.stream())
        await uploads.finish(session, digest)
        return _blob_created(name, digest)


_CONTENT_RANGE = re.compile(r"\s*(?:bytes[ =])?\s*([0-9]{1,18})-([0-9]{1,18})(?:/[0-9*]+)?\s*")


def _chunk_range(header: str | None, name: str, session: Session) -> int | None:
    """The length a chunked PATCH's ``Content-Range`` announces (None: streamed); 416
    unless it starts where the upload is."""
    if header is None:
        return None
    m = _CONTENT_RANGE.fullmatch(header)
    if not m or int(m.group(2)) < int(m.group(1)):
        raise BlobUploadInvalid(f"malformed Content-Range {header[:100]!r}")
    start, end = int(m.group(1)), int(m.group(2))
    if start != session.offset:
        raise RangeNotSatisfiable(
            f"chunk starts at {start}, the upload is at {session.offset}",
            headers=_upload_headers(name, session))
    return end - start + 1


def _upload_headers(name: str, session: Session) -> dict[str, str]:
    return {"Location": f"/v2/{name}/blobs/uploads/{session.id}",
            "Range": f"0-{max(session.offset - 1, 0)}",
            "Docker-Upload-UUID": session.id, "OCI-Chunk-Min-Length": str(CHUNK_MIN)}


def _upload_answer(status: int, name: str, session: Session) -> Response:
    return Response(status_code=status, headers={**_upload_headers(name, session),
                                                 "Content-Length": "0"})


def _blob_created(name: str, digest: str) -> Response:
    return Response(status_code=201, headers={"Location": f"/v2/{name}/blobs/{digest}",
                                              "Docker-Content-Digest": digest,
                                              "Content-Length": "0"})
