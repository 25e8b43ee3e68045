"""The read side of the web page: the overview, the repository list, a repository, an
image. Everything shown comes from this process's cache maps and the index (through
catalog.py); no page ever asks an upstream.

URLs: ``/ui/`` (overview), ``/ui/repositories?q=&sort=name|size|last_pull|pulls&order=
asc|desc&page=N&per=50``, ``/ui/r/<upstream>/<name>`` (a cached repository),
``/ui/hosted/<name>`` (a hosted one), and either followed by ``@<digest>`` (an image).
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import quote, urlencode

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from .. import fill_shared, upstream_status
from ..admin import COUNTERS, by_source
from ..catalog import PAGE_SIZE, SORTS
from ..errors import RegistryError
from ..fill_shared import FillProgress
from ..models import HOSTED, INDEX_TYPES, is_digest, validate_digest, validate_name
from . import views
from .session import Viewer, viewer
from .site import Site, public_host, render, site

CONFIG_MAX = 1024 * 1024       # an image config bigger than this is not read for the page
PER_PAGE_MAX = 500            # repositories a page may ask for (?per=)
TAG_PLATFORMS_MAX = 100        # image indexes per repository page whose platforms are read


def repo_url(upstream: str, repository: str, digest: str | None = None) -> str:
    base = (f"/ui/hosted/{quote(repository)}" if upstream == HOSTED
            else f"/ui/r/{quote(upstream)}/{quote(repository)}")
    return base + (f"@{digest}" if digest else "")


# -- overview ------------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    s = site(request)
    counters = {name: 0 for name in COUNTERS} | await s.catalog.index.counters()
    c = counters
    hits = c["blob_hits"] + c["manifest_hits"]
    asked = hits + c["blob_misses"] + c["manifest_misses"]
    served = c["bytes_from_cache"] + c["bytes_from_upstream"]
    budget = s.config.max_size
    cached = s.local.cached_size
    now = time.time()
    hourly = await _hourly(s, now - 7 * 86400)
    snap = await s.catalog.snapshot()
    context: dict[str, Any] = {
        "cached": cached, "hosted": s.local.hosted_size, "budget": budget,
        "used": min(1.0, cached / budget) if budget else None,
        "high_watermark": s.config.high_watermark,
        "counters": c, "hit_ratio": views.ratio(hits, asked),
        "blob_ratio": views.ratio(c["blob_hits"], c["blob_hits"] + c["blob_misses"]),
        "manifest_ratio": views.ratio(c["manifest_hits"],
                                      c["manifest_hits"] + c["manifest_misses"]),
        "byte_ratio": views.ratio(c["bytes_from_cache"], served),
        "repositories": len(snap.rows),
        "by_source": by_source(counters),
        "day": views.chart(views.bars(hourly, 24, now), "last 24 hours", 3),
        "week": views.chart(views.bars(hourly, 7 * 24, now, per_bar=3), "last 7 days", 8,
                            "%a"),
        "day_totals": _totals(hourly, now - 24 * 3600),
        "week_totals": _totals(hourly, now - 7 * 86400),
        "upstreams": await _health(s),
        "fills": await _fills(s),
    }
    return await render(request, "overview.html", context)


async def _hourly(s: Site, since: float) -> dict[int, dict[str, int]]:
    """The hourly counters (the reader's connection: a week is at most 168 hours x a
    few dozen names)."""
    return await s.catalog.index.hourly(since)


def _totals(hourly: dict[int, dict[str, int]], since: float) -> dict[str, int]:
    first = int(since // 3600)
    out = {"bytes_from_cache": 0, "bytes_from_upstream": 0}
    for key, row in hourly.items():
        if views.hour_of(key) >= first:
            for name in out:
                out[name] += int(row.get(name, 0))
    return out


async def _health(s: Site) -> list[dict[str, Any]]:
    """Each upstream's sources as any worker (of any replica, in a site) last saw them: up
    or down, last error and success, rate limit left; a source nothing has asked yet is
    "unknown"."""
    seen = await upstream_status.read_status(s.local.data_dir,
                                             shared=upstream_status.site_wide())
    return [{"upstream": name, "url": up.url,
             "status": [st for st in seen if st.upstream == name]}
            for name, up in s.config.upstreams.items()]


async def _fills(s: Site) -> list[FillProgress]:
    return await fill_shared.in_progress(s.local.data_dir)


# -- the repository list -------------------------------------------------------------------


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or len(raw) > 9 or int(raw) < 1:
        raise HTTPException(400, f"{name} must be a whole number from 1, not {raw[:40]!r}")
    return int(raw)


async def repositories(request: Request) -> Response:
    s = site(request)
    who = await viewer(request)
    q = request.query_params.get("q", "")[:200]
    sort = request.query_params.get("sort", "name")
    if sort not in SORTS:
        raise HTTPException(400, f"sort must be one of {', '.join(SORTS)}")
    order = request.query_params.get("order", "asc" if sort == "name" else "desc")
    if order not in ("asc", "desc"):
        raise HTTPException(400, "order must be asc or desc")
    number = _int(request, "page", 1)
    per = min(_int(request, "per", PAGE_SIZE), PER_PAGE_MAX)
    page = await s.catalog.page(q, sort, order == "desc", number, who.may_pull, per)
    if number > page.pages:
        raise HTTPException(404, f"page {number} of {page.pages}")

    def link(**changes: Any) -> str:
        params = {"q": q, "sort": sort, "order": order, "page": page.page,
                  "per": per if per != PAGE_SIZE else ""} | changes
        return "/ui/repositories?" + urlencode({k: v for k, v in params.items() if v != ""})

    def sort_link(key: str) -> str:
        flip = "desc" if order == "asc" else "asc"
        default = "asc" if key == "name" else "desc"
        return link(sort=key, order=flip if key == sort else default, page=1)

    rows = [{"row": r, "url": repo_url(r.upstream, r.repository)} for r in page.rows]
    return await render(request, "repositories.html", {
        "page": page, "rows": rows, "q": q, "sort": sort, "order": order,
        "sort_link": sort_link, "link": link,
        "age": time.monotonic() - page.taken, "per": per})


# -- a repository and an image -------------------------------------------------------------


def _parse(path: str) -> tuple[str, str | None]:
    """``name[@digest]`` -> (name, digest), both checked (a 400 when malformed)."""
    name, at, digest = path.partition("@")
    validate_name(name)
    if at:
        validate_digest(digest)
        return name, digest
    return name, None


def _allowed(s: Site, who: Viewer, upstream: str, repository: str) -> None:
    if upstream != HOSTED and upstream not in s.config.upstreams:
        raise HTTPException(404, f"no upstream named {upstream[:100]!r}")
    if not who.may_pull(upstream, repository):
        # as for a repository that is not here: the page does not say what exists
        raise HTTPException(404, f"nothing here for {repository[:200]}")


async def cached_repository(request: Request) -> Response:
    upstream = request.path_params["upstream"]
    return await _repository_or_image(request, upstream, request.path_params["name"])


async def hosted_repository(request: Request) -> Response:
    return await _repository_or_image(request, HOSTED, request.path_params["name"])


async def _repository_or_image(request: Request, upstream: str, path: str) -> Response:
    s = site(request)
    who = await viewer(request)
    repository, digest = _parse(path)
    _allowed(s, who, upstream, repository)
    if digest is not None:
        return await _image(request, s, who, upstream, repository, digest)
    return await _repository(request, s, who, upstream, repository)


async def _read_manifest(s: Site, digest: str) -> Any:
    """A cached manifest's JSON (None: not cached). Read from the blob store, not
    through the cache, so looking at it is not a use (it counts for eviction)."""
    if s.local.manifest_info(digest) is None:
        return None
    try:
        data = await s.local.store.read_small(digest)
        if data is None:
            return None
        return json.loads(data), data
    except (OSError, ValueError, RegistryError):
        return None


async def _platforms(s: Site, digest: str) -> list[dict[str, Any]]:
    found = await _read_manifest(s, digest)
    if found is None:
        return []
    children = views.platforms(found[0])
    for child in children:
        cached = s.local.manifest_info(child["digest"]) is not None
        child["size"] = await s.catalog.index.closure_size(child["digest"]) if cached else None
    return children


async def _repository(request: Request, s: Site, who: Viewer, upstream: str,
                      repository: str) -> Response:
    index = s.catalog.index
    tags = await index.tag_report(upstream, repository)
    pins = await index.pins(upstream, repository)
    linked = await s.catalog.linked_size(upstream, repository)
    if not tags and not pins and linked is None:
        if upstream != HOSTED and "/" not in repository \
                and s.config.upstreams[upstream].library_prefix:
            # /ui/r/docker.io/alpine: the name as a client pulls it
            return RedirectResponse(repo_url(upstream, f"library/{repository}"), 307)
        raise HTTPException(404, f"nothing cached or pushed for {repository[:200]}")
    now = time.time()
    name = s.router.display_name(upstream, repository)
    platforms: dict[str, list[dict[str, Any]]] = {}
    for t in tags:
        if t["media_type"] in INDEX_TYPES and t["digest"] not in platforms \
                and len(platforms) < TAG_PLATFORMS_MAX:
            platforms[t["digest"]] = await _platforms(s, t["digest"])
        t["fresh"] = t["expires_at"] > now
        t["url"] = repo_url(upstream, repository, t["digest"])
    host = public_host(request)
    pulled = [t["last_pull"] for t in tags if t["last_pull"]]
    return await render(request, "repository.html", {
        "upstream": upstream, "repository": repository, "name": name,
        "hosted": upstream == HOSTED, "tags": tags, "platforms": platforms,
        "pins": [p[2] for p in pins], "size": linked or 0,
        "pulls": sum(t["pulls"] for t in tags), "last_pull": max(pulled, default=None),
        "pull_ref": f"{host}/{name}", "ttl": (None if upstream == HOSTED
                                              else s.config.upstreams[upstream].tag_ttl),
        "repo_url": repo_url(upstream, repository), "now": now})


async def _image(request: Request, s: Site, who: Viewer, upstream: str, repository: str,
                 digest: str) -> Response:
    if not await s.catalog.index.is_linked(upstream, repository, digest):
        raise HTTPException(404, f"{digest} is not cached in {repository[:200]}")
    found = await _read_manifest(s, digest)
    if found is None:
        raise HTTPException(404, f"{digest} is not cached in {repository[:200]}")
    doc, data = found
    info = s.local.manifest_info(digest)
    media_type = (info.media_type if info else None) or doc.get("mediaType")
    name = s.router.display_name(upstream, repository)
    context: dict[str, Any] = {
        "upstream": upstream, "repository": repository, "name": name, "digest": digest,
        "hosted": upstream == HOSTED, "media_type": media_type, "manifest_size": len(data),
        "manifest": views.pretty_json(data), "repo_url": repo_url(upstream, repository),
        "pull_ref": f"{public_host(request)}/{name}@{digest}",
        "tags": [t for t in await s.catalog.index.tag_report(upstream, repository)
                 if t["digest"] == digest],
        "pinned": any(p[2] == digest for p in await s.catalog.index.pins(upstream,
                                                                         repository)),
        "size": await s.catalog.index.closure_size(digest),
        "referrers": [{"r": r, "url": repo_url(upstream, repository, r.digest)}
                      for r in await s.catalog.referrers(upstream, repository, digest)],
        "children": [], "layers": [], "config": None, "config_digest": None,
        "subject": None,
    }
    if media_type in INDEX_TYPES or "manifests" in doc:
        children = await _platforms(s, digest)
        for child in children:
            child["url"] = repo_url(upstream, repository, child["digest"])
        context["children"] = children
    else:
        sizes = {d: size for d, _, size in await s.catalog.children(digest)}
        for layer in doc.get("layers") or []:
            if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
                context["layers"].append({
                    "digest": layer["digest"], "media_type": layer.get("mediaType"),
                    "size": layer.get("size"), "cached": sizes.get(layer["digest"]) is not None})
        config = doc.get("config")
        if isinstance(config, dict) and isinstance(config.get("digest"), str):
            context["config_digest"] = config["digest"]
            context["config"] = await _config(s, config["digest"])
    subject = doc.get("subject")
    if isinstance(subject, dict) and isinstance(subject.get("digest"), str) \
            and is_digest(subject["digest"]):
        context["subject"] = {"digest": subject["digest"],
                              "url": repo_url(upstream, repository, subject["digest"])}
    return await render(request, "image.html", context)


async def _config(s: Site, digest: str) -> dict[str, Any] | None:
    size = s.local.blob_size(digest)
    if size is None or size > CONFIG_MAX:
        return None
    try:
        data = await s.local.store.read_small(digest)
        doc = json.loads(data) if data is not None else None
    except (OSError, ValueError, RegistryError):
        return None
    return views.config_summary(doc) if isinstance(doc, dict) else None


async def root(request: Request) -> Response:
    return RedirectResponse("/ui/", 307)


PAGES: list[BaseRoute] = [
    Route("/", overview, methods=["GET"], name="overview"),
    Route("/repositories", repositories, methods=["GET"], name="repositories"),
    Route("/r/{upstream}/{name:path}", cached_repository, methods=["GET"], name="cached"),
    Route("/hosted/{name:path}", hosted_repository, methods=["GET"], name="hosted"),
]
