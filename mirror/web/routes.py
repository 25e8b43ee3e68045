"""The web page's routes, gathered: the pages (pages.py), the login and the actions
(session.py, actions.py), and the redirect from ``/``. ``create()`` is the app app.py
mounts at ``/ui``."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from . import pages, site

root = pages.root

ROUTES: list[BaseRoute] = [*pages.PAGES]


def create() -> Starlette:
    return site.create(ROUTES)
