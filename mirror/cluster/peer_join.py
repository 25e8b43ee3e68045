"""Joining a site of replicas at start-up (app.py's lifespan calls these two).

``open_site(config)``: None on one machine (no ``index.postgres``); else the ``Site``
(peer_site.py), or ``CannotJoin`` with one line naming the key. ``attach(app, site,
local, sources)``: every proxy's fills take the site's fill lease (peer_fill.py), and
the peer endpoints (peer_routes.py) answer from this replica's fills and cache.
"""

from __future__ import annotations

from typing import Any

from .peer_fill import fill_hook
from .peer_routes import PeerState
from .peer_site import CannotJoin, Site

__all__ = ["CannotJoin", "attach", "open_site"]


async def open_site(config: Any) -> Site | None:
    if config.index.postgres is None:
        return None
    return await Site.open(config)


def attach(app: Any, site: Site | None, local: Any, sources: dict[str, Any]) -> None:
    if site is None:
        app.state.peer = None
        return
    hook = fill_hook(site)
    for source in sources.values():
        if hasattr(source, "site"):         # a ProxyStore: its fills go upstream
            source.site = hook
    app.state.peer = PeerState(site, local, sources)
