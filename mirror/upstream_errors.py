"""The one place upstream failures become ``RegistryError``s.

``error`` maps an upstream's HTTP answer (status, OCI error body, ``Retry-After``)
to the error the mirror answers with; ``unavailable`` maps a transport failure (no
usable answer: refused, timed out, broken mid-body, TLS) to ``UpstreamUnavailable``,
in the words of the innermost OS or TLS error (``_reason``). Whatever talks to an
upstream maps through these two and nowhere else; ``api`` then maps the errors to HTTP.
"""

from __future__ import annotations

import json
import os
import re
import ssl

import httpx

from .errors import (
    BY_CODE,
    BlobUnknown,
    Denied,
    ManifestUnknown,
    NameUnknown,
    RegistryError,
    UpstreamRateLimited,
    UpstreamUnavailable,
)


def error(upstream: str, resp: httpx.Response, body: bytes, what: str, repository: str,
          reference: str) -> RegistryError:
    """The error for an answer other than the one asked for (``what``: "manifest",
    "blob" or "name", for the kind of 404)."""
    status = resp.status_code
    code, message = _upstream_error(body)
    where = f"upstream {upstream}"
    detail = {"upstream": upstream, "status": status}
    if status == 429:
        return UpstreamRateLimited(f"{where} rate limit reached: {message or 'too many requests'}",
                                   detail=detail, headers=retry_after(resp))
    if status >= 500:
        return UpstreamUnavailable(f"{where} answered {status}: {message or resp.reason_phrase}",
                                   detail=detail)
    if status in (401, 403):
        return Denied(f"{where} denied access to {repository} ({message or status}); "
                      "the repository may not exist or need credentials", detail=detail)
    if status == 404:
        cls = BY_CODE.get(code or "") or {"manifest": ManifestUnknown, "blob": BlobUnknown}.get(
            what, NameUnknown)
        return cls(f"{where}: {message or 'not found'}: {repository}"
                   f"{'@' if ':' in reference else ':'}{reference}" if reference else
                   f"{where}: {message or 'not found'}: {repository}", detail=detail)
    known = BY_CODE.get(code or "")
    if known is not None:
        return known(f"{where}: {message}", detail=detail)
    return UpstreamUnavailable(f"{where} answered {status}", detail=detail)


def unavailable(upstream: str, exc: httpx.TransportError, doing: str) -> UpstreamUnavailable:
    """The one mapping of a transport failure (no usable HTTP answer) to an OCI error."""
    if isinstance(exc, httpx.ConnectError):
        what = "could not connect"
    elif isinstance(exc, httpx.TimeoutException):
        what = f"timed out {doing}"
    else:
        what = f"connection broke {doing}"
    detail = {"upstream": upstream}
    reason = _reason(exc)
    if reason:
        what += f": {reason}"
        detail["reason"] = reason
    return UpstreamUnavailable(f"upstream {upstream}: {what} ({type(exc).__name__})", detail=detail)


def retry_after(resp: httpx.Response) -> dict[str, str]:
    """The ``Retry-After`` of a rate-limited answer, to pass on to the client."""
    value = resp.headers.get("retry-after", "")
    return {"Retry-After": value} if value and len(value) < 64 else {}


def _reason(exc: BaseException) -> str | None:
    """Why a transport failed, in the words of the innermost OS or TLS error of the chain
    ("Connection refused", "Name or service not known", "[SSL: ...] certificate verify
    failed: self-signed certificate"); else httpx's own message, when it has one."""
    reason = None
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ssl.SSLError):
            reason = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(cur)) or cur.reason or reason
        elif isinstance(cur, OSError):
            if cur.errno and cur.errno > 0:
                reason = os.strerror(cur.errno)
            elif cur.strerror:
                reason = cur.strerror
        cur = cur.__cause__ or cur.__context__
    if reason is None and not isinstance(exc, httpx.TimeoutException):
        reason = str(exc) or None
    return reason[:200] if reason else None


def _upstream_error(body: bytes) -> tuple[str | None, str | None]:
    try:
        err = json.loads(body)["errors"][0]
        return str(err.get("code"))[:64], str(err.get("message"))[:300]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None, None
