"""The web page's application: a Starlette app mounted at ``/ui`` by app.py, what its
pages read from (``Site``: the config, the cache, the router, the catalog), the
templates, and HTML error pages (bad input on the page is a 4xx page, not JSON, and
never a 500)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..cache import LocalCache
from ..catalog import Catalog
from ..config import Config
from ..errors import RegistryError
from ..hosted.store import HostedStore
from ..routing import Router
from . import views
from .session import needs_login, take_flash, viewer

log = logging.getLogger("mirror.web")
HERE = Path(__file__).parent

# Scripts and styles from this server only (style="" attributes draw the bars); no
# framing; forms post here only; pages are not cached (they change every reload).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; "
                               "form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.filters.update(size=views.human_size, ago=views.since, when=views.when,
                             short_type=views.short_type, percent=views.percent)


@dataclass
class Site:
    config: Config
    local: LocalCache
    router: Router
    catalog: Catalog
    hosted: HostedStore | None


def site(request: Request) -> Site:
    found = getattr(request.app.state, "site", None)
    if found is None:
        raise HTTPException(503, "the mirror is starting")
    assert isinstance(found, Site)
    return found


def public_host(request: Request) -> str:
    """The address clients pull from: ``public_url``'s when set, else the one this
    request came in on."""
    config = site(request).config
    if config.public_url:
        return urlsplit(config.public_url).netloc
    return request.url.netloc


async def render(request: Request, name: str, context: dict[str, Any],
                 status: int = 200) -> Response:
    who = await viewer(request)
    if status < 400 and (login := needs_login(request, who)) is not None:
        return login
    found = getattr(request.app.state, "site", None)
    logins = found is not None and found.config.auth is not None
    return templates.TemplateResponse(request, name, {"viewer": who, "here": _here(request),
                                                      "logins": logins,
                                                      "flash": take_flash(request), **context},
                                      status_code=status, headers=HEADERS)


def _here(request: Request) -> str:
    """This page's path and query, for an action's ``next``."""
    url = request.url
    return url.path + (f"?{url.query}" if url.query else "")


async def _error_page(request: Request, status: int, message: str) -> Response:
    try:
        return await render(request, "error.html", {"status": status, "message": message},
                            status)
    except Exception:      # the error page itself failed: plain text rather than nothing
        log.exception("rendering the error page failed")
        return Response(f"{status} {message}\n", status, media_type="text/plain")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else \
        f"no such page: {request.url.path[:200]}"
    return await _error_page(request, exc.status_code, str(message))


async def registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return await _error_page(request, exc.status, exc.message)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return await _error_page(request, 500, "internal error; see the mirror's log")


def create(routes: list[BaseRoute]) -> Starlette:
    """The ``/ui`` app serving ``routes`` and ``/ui/static``."""
    return Starlette(
        routes=[*routes, Mount("/static", StaticFiles(directory=str(HERE / "static")),
                               name="static")],
        exception_handlers={HTTPException: http_error, RegistryError: registry_error,
                            Exception: unexpected_error})
