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

    def __init_subclass__(cls, code: str | None = None, status: int | None = None,
                          message: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if status is not None:
            cls.status = status
        if message is not None:
            cls.default_message = message

    def __init__(self, message: str | None = None, detail: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self, kind: str | None = None) -> dict[str, Any]:
        """The OCI error body. ``kind`` (manifest, blob, tags, catalog) is what the
        request was about; it picks the code a server-side failure is reported under."""
        code = wire_code(self, kind)
        detail = self.detail
        if code != self.code:
            # The spec's table has no code for this; say what it really was in detail.
            detail = {**(detail if isinstance(detail, dict) else
                         {} if detail is None else {"detail": detail}), "code": self.code}
        return {"errors": [{"code": code, "message": self.message, "detail": detail}]}


# The plain codes: one class each, set up by ``RegistryError.__init_subclass__``.
class BlobUnknown(RegistryError, code="BLOB_UNKNOWN", status=404,
                  message="blob unknown to registry"): ...


class BlobUploadInvalid(RegistryError, code="BLOB_UPLOAD_INVALID", status=400,
                        message="blob upload invalid"): ...


class BlobUploadUnknown(RegistryError, code="BLOB_UPLOAD_UNKNOWN", status=404,
                        message="blob upload unknown to registry"): ...


class DigestInvalid(RegistryError, code="DIGEST_INVALID", status=400,
                    message="provided digest did not match uploaded content"): ...


class ManifestBlobUnknown(RegistryError, code="MANIFEST_BLOB_UNKNOWN", status=404,
                          message="manifest references a manifest or blob unknown to registry"): ...


class ManifestInvalid(RegistryError, code="MANIFEST_INVALID", status=400,
                      message="manifest invalid"): ...


class ManifestUnknown(RegistryError, code="MANIFEST_UNKNOWN", status=404,
                      message="manifest unknown to registry"): ...


class NameInvalid(RegistryError, code="NAME_INVALID", status=400,
                  message="invalid repository name"): ...


class NameUnknown(RegistryError, code="NAME_UNKNOWN", status=404,
                  message="repository name not known to registry"): ...


class SizeInvalid(RegistryError, code="SIZE_INVALID", status=400,
                  message="provided length did not match content length"): ...


class PayloadTooLarge(SizeInvalid, status=413):
    """A request body over the mirror's limit (a manifest over 4 MiB): 413, as the spec
    asks for manifests, with the table's SIZE_INVALID code."""


class TagInvalid(RegistryError, code="TAG_INVALID", status=400,
                 message="manifest tag did not match URI"): ...


class Unauthorized(RegistryError, code="UNAUTHORIZED", status=401,
                   message="authentication required"): ...


class Denied(RegistryError, code="DENIED", status=403,
             message="requested access to the resource is denied"): ...


class Unsupported(RegistryError, code="UNSUPPORTED", status=405,
                  message="the operation is unsupported"): ...


class TooManyRequests(RegistryError, code="TOOMANYREQUESTS", status=429,
                      message="too many requests"): ...


class RangeNotSatisfiable(RegistryError, code="RANGE_INVALID", status=416,
                          message="requested range not satisfiable"): ...


class PaginationInvalid(RegistryError, code="PAGINATION_NUMBER_INVALID", status=400,
                        message="invalid number of results requested"): ...


class NotFound(RegistryError, code="NOT_FOUND", status=404,
               message="no such endpoint"): ...


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
