"""Registry errors, one class per OCI error code.

Every layer raises these; ``api.py`` turns them into the OCI JSON body
``{"errors": [{"code", "message", "detail"}]}`` in one place.
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    code = "UNKNOWN"
    status = 500
    default_message = "unknown error"

    def __init__(self, message: str | None = None, detail: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self, kind: str | None = None) -> dict:
        """The OCI error body. ``kind`` (manifest, blob, tags, catalog) is what the
        request was about; it picks the code a server-side failure is reported under."""
        code = wire_code(self, kind)
        detail = self.detail
        if code != self.code:
            # The spec's table has no code for this; say what it really was in detail.
            detail = {**(detail if isinstance(detail, dict) else
                         {} if detail is None else {"detail": detail}), "code": self.code}
        return {"errors": [{"code": code, "message": self.message, "detail": detail}]}


def _error(code: str, status: int, message: str) -> type[RegistryError]:
    cls = type(code.title().replace("_", ""), (RegistryError,),
               {"code": code, "status": status, "default_message": message})
    cls.__module__ = __name__
    return cls


BlobUnknown = _error("BLOB_UNKNOWN", 404, "blob unknown to registry")
BlobUploadInvalid = _error("BLOB_UPLOAD_INVALID", 400, "blob upload invalid")
BlobUploadUnknown = _error("BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry")
DigestInvalid = _error("DIGEST_INVALID", 400, "provided digest did not match uploaded content")
ManifestBlobUnknown = _error("MANIFEST_BLOB_UNKNOWN", 404, "manifest references a manifest or blob unknown to registry")
ManifestInvalid = _error("MANIFEST_INVALID", 400, "manifest invalid")
ManifestUnknown = _error("MANIFEST_UNKNOWN", 404, "manifest unknown to registry")
NameInvalid = _error("NAME_INVALID", 400, "invalid repository name")
NameUnknown = _error("NAME_UNKNOWN", 404, "repository name not known to registry")
SizeInvalid = _error("SIZE_INVALID", 400, "provided length did not match content length")
TagInvalid = _error("TAG_INVALID", 400, "manifest tag did not match URI")
Unauthorized = _error("UNAUTHORIZED", 401, "authentication required")
Denied = _error("DENIED", 403, "requested access to the resource is denied")
Unsupported = _error("UNSUPPORTED", 405, "the operation is unsupported")
TooManyRequests = _error("TOOMANYREQUESTS", 429, "too many requests")
RangeNotSatisfiable = _error("RANGE_INVALID", 416, "requested range not satisfiable")
PaginationInvalid = _error("PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested")
NotFound = _error("NOT_FOUND", 404, "no such endpoint")


class UpstreamUnavailable(RegistryError):
    """The upstream could not give an answer: unreachable, timed out, 5xx or 429.

    The proxy treats this as transient: it serves a cached copy when it has one.
    """

    code = "UNAVAILABLE"
    status = 503
    default_message = "upstream registry unavailable"


class UpstreamRateLimited(UpstreamUnavailable):
    code = "TOOMANYREQUESTS"
    status = 429
    default_message = "upstream registry rate limit reached"


class CacheUnavailable(RegistryError):
    """The mirror's own storage failed (disk full, I/O error)."""

    code = "UNAVAILABLE"
    status = 503
    default_message = "the mirror's cache storage is unavailable"


class UpstreamBadContent(UpstreamUnavailable):
    """Upstream sent bytes that do not match the digest they are addressed by."""

    code = "DIGEST_INVALID"
    status = 502
    default_message = "upstream registry sent content that does not match its digest"


# The codes of the OCI distribution spec's error table: the only ones a client sees.
OCI_CODES = frozenset({
    "BLOB_UNKNOWN", "BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN", "MANIFEST_INVALID", "MANIFEST_UNKNOWN", "NAME_INVALID",
    "NAME_UNKNOWN", "SIZE_INVALID", "UNAUTHORIZED", "DENIED", "UNSUPPORTED", "TOOMANYREQUESTS"})
# A server-side failure (5xx: upstream unavailable, cache storage failing, a bug) has
# no code of its own in that table: it is reported as "could not get" what was asked
# for, with the status, the message and detail.code saying what really happened.
_FAILED_KIND = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN", "tags": "NAME_UNKNOWN",
                "catalog": "NAME_UNKNOWN"}


def wire_code(exc: RegistryError, kind: str | None = None) -> str:
    """The OCI code ``exc`` is answered with (see the README's table)."""
    if exc.code in OCI_CODES:
        return exc.code
    if exc.status >= 500:
        return _FAILED_KIND.get(kind or "", "UNSUPPORTED")
    return "UNSUPPORTED"    # 4xx without a code of its own: bad parameter, no such endpoint


# Upstream OCI error codes the mirror passes on as they are (status from our table).
BY_CODE: dict[str, type[RegistryError]] = {
    cls.code: cls for cls in (BlobUnknown, ManifestUnknown, NameUnknown, NameInvalid,
                              DigestInvalid, ManifestInvalid, TagInvalid, Unsupported)
}
