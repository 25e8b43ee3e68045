"""Events in registry:2's form, and the hook the rest of the mirror calls to emit them.

A place where something happens calls one function here (``pulled``, ``pushed``,
``deleted``, ``fetched``, ``evicted``, ``stale``): an in-memory call that builds an
``Event`` and hands it to ``sink`` (the Notifier, wired up by app.py; None: nothing is
configured and the call costs next to nothing). The request that caused it (id, client
address, Host, method, User-Agent, the user it logged in as) comes from ``begin``,
which the access log calls as each request starts; an event with no request behind it
(an eviction, a fill that outlived its client) has an empty ``request``.

The event's ``repository`` and ``url`` need the router and the public address: the
Notifier fills them in (``Event.render``). This module imports nothing of the mirror's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

BLOB_TYPE = "application/octet-stream"     # registry:2's mediaType for blob events


@dataclass
class RequestInfo:
    """What the event's ``request`` and ``actor`` say; ``user`` is the note the access
    log keeps (filled in once the login is checked)."""

    scope: MutableMapping[str, Any]
    note: Any = None             # metrics.RequestNote: .user ("-": anonymous)
    id: str = ""

    def render(self) -> tuple[dict[str, str], dict[str, str]]:
        if not self.id:
            self.id = str(uuid.uuid4())
        client = self.scope.get("client") or ("", 0)
        headers = {k: v for k, v in self.scope.get("headers", ()) if k in (b"host",
                                                                         b"user-agent")}
        request = {"id": self.id, "addr": f"{client[0]}:{client[1]}" if client[0] else "",
                   "host": headers.get(b"host", b"").decode("latin-1")[:300],
                   "method": self.scope.get("method", ""),
                   "useragent": headers.get(b"user-agent", b"").decode("latin-1")[:300]}
        user = getattr(self.note, "user", "-")
        return request, ({} if user in ("-", "") else {"name": user})


_request: ContextVar[RequestInfo | None] = ContextVar("mirror_notify_request", default=None)


def begin(scope: MutableMapping[str, Any], note: Any) -> None:
    """A request starts (accesslog.py): events it causes name it."""
    if sink is not None:
        _request.set(RequestInfo(scope, note))


@dataclass
class Event:
    action: str
    upstream: str                # "" for hosted repositories (routing.HOSTED)
    repository: str              # as stored; the Notifier turns it into the name clients use
    digest: str = ""
    media_type: str = ""
    size: int | None = None
    tag: str = ""
    kind: str = "manifest"       # manifest | blob (for the target's url)
    mounted_from: tuple[str, str] | None = None    # (upstream, repository) of a mount
    request: RequestInfo | None = None
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    timestamp: str = field(default_factory=lambda: datetime.now(UTC).isoformat(
        timespec="microseconds").replace("+00:00", "Z"))

    def render(self, name: Callable[[str, str], str], base_url: str,
               source: dict[str, str]) -> dict[str, Any]:
        """The event as registry:2 sends it; ``name(upstream, repository)`` is the name
        clients use, ``base_url`` (scheme://host, or "") the start of the target's url."""
        repository = name(self.upstream, self.repository) if self.repository else ""
        target: dict[str, Any] = {}
        if self.media_type:
            target["mediaType"] = self.media_type
        if self.size is not None:
            target["size"] = self.size
        if self.digest:
            target["digest"] = self.digest
        if self.size is not None:
            target["length"] = self.size
        target["repository"] = repository
        if self.digest and base_url and repository:
            target["url"] = f"{base_url}/v2/{repository}/{self.kind}s/{self.digest}"
        if self.tag:
            target["tag"] = self.tag
        if self.mounted_from is not None:
            target["fromRepository"] = name(*self.mounted_from)
        request, actor = self.request.render() if self.request is not None else ({}, {})
        return {"id": self.id, "timestamp": self.timestamp, "action": self.action,
                "target": target, "request": request, "actor": actor, "source": source}


# Set by app.py to the Notifier's ``accept`` while notifications are configured.
sink: Callable[[Event], None] | None = None


def _emit(action: str, upstream: str, repository: str, **fields: Any) -> None:
    if sink is not None:
        sink(Event(action, upstream, repository, request=_request.get(), **fields))


def pulled(upstream: str, repository: str, digest: str, media_type: str, size: int,
           tag: str = "") -> None:
    """A manifest GET answered (``tag``: asked for by tag)."""
    _emit("pull", upstream, repository, digest=digest, media_type=media_type, size=size,
          tag=tag)


def pulled_blob(upstream: str, repository: str, digest: str, size: int | None) -> None:
    _emit("pull", upstream, repository, digest=digest, media_type=BLOB_TYPE, size=size,
          kind="blob")


def pushed(repository: str, digest: str, media_type: str, size: int, tag: str = "") -> None:
    """A manifest PUT into a hosted repository."""
    _emit("push", "", repository, digest=digest, media_type=media_type, size=size, tag=tag)


def pushed_blob(repository: str, digest: str, size: int) -> None:
    """A blob upload into a hosted repository completed."""
    _emit("push", "", repository, digest=digest, media_type=BLOB_TYPE, size=size, kind="blob")


def mounted(repository: str, digest: str, size: int, source: tuple[str, str]) -> None:
    """A blob mounted from another repository (registry:2's ``mount``)."""
    _emit("mount", "", repository, digest=digest, media_type=BLOB_TYPE, size=size,
          kind="blob", mounted_from=source)


def deleted(repository: str, digest: str = "", tag: str = "", kind: str = "manifest") -> None:
    """A manifest (by digest), tag or blob deleted from a hosted repository: the target
    names the digest, or the tag, as registry:2's does."""
    _emit("delete", "", repository, digest=digest, tag=tag, kind=kind)


def fetched(upstream: str, repository: str, digest: str, media_type: str, size: int) -> None:
    """A manifest fetched from upstream into the cache."""
    _emit("mirror.fetch", upstream, repository, digest=digest, media_type=media_type,
          size=size)


def fetched_blob(upstream: str, repository: str, digest: str, size: int) -> None:
    """A blob fetched from upstream into the cache."""
    _emit("mirror.fetch", upstream, repository, digest=digest, media_type=BLOB_TYPE,
          size=size, kind="blob")


def evicted(blobs: Mapping[str, int], manifests: Mapping[str, int]) -> None:
    """Cached content evicted (digest -> size). It belongs to no single repository:
    ``repository`` is empty."""
    if sink is not None:
        for digest, size in blobs.items():
            _emit("mirror.evict", "", "", digest=digest, size=size, media_type=BLOB_TYPE,
                  kind="blob")
        for digest, size in manifests.items():
            _emit("mirror.evict", "", "", digest=digest, size=size)


def stale(upstream: str, repository: str, digest: str, media_type: str, size: int,
          tag: str = "") -> None:
    """A cached manifest served because upstream failed."""
    _emit("mirror.stale", upstream, repository, digest=digest, media_type=media_type,
          size=size, tag=tag)
