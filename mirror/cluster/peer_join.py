"""Joining a site of replicas at start-up (app.py's lifespan calls these two).

``open_site(config)``: None on one machine (no ``index.postgres``); else the ``Site``
(peer_site.py), or ``CannotJoin`` with one line naming the key. ``attach(app, site,
local, sources)``: every proxy's fills take the site's fill lease (peer_fill.py), the
peer endpoints (peer_routes.py) answer from this replica's fills and cache, and upload
sessions are recorded and forwarded to the replica holding them (peer_uploads.py).
``ROUTES``: the internal endpoints, which app.py mounts.
"""

from __future__ import annotations

from typing import Any

from . import peer_routes, peer_uploads
from .peer_fill import fill_hook
from .peer_routes import PeerState
from .peer_site import CannotJoin, Site

__all__ = ["CannotJoin", "ROUTES", "attach", "migrate", "open_site"]

ROUTES = [*peer_routes.ROUTES, *peer_uploads.ROUTES]


async def migrate(conn: Any) -> int:
    """Every table of the peer channel and the fill lease (for `mirror migrate`); the
    number of migrations run. A replica applies them at start-up as well."""
    from . import lease, peer_auth, schema
    from .peer_site import RECENT_MIGRATIONS

    return (await lease.migrate(conn) + await peer_auth.migrate(conn)
            + await schema.apply(conn, "peer_recent_fills", RECENT_MIGRATIONS)
            + await peer_uploads.migrate(conn))


async def open_site(config: Any) -> Site | None:
    if config.index.postgres is None:
        return None
    site = await Site.open(config)
    try:
        async with site.pool.acquire() as conn:
            await peer_uploads.migrate(conn)
    except Exception as exc:
        await site.close()
        raise CannotJoin(f"index.postgres.dsn: cannot set up the upload table in "
                         f"{config.index.postgres.safe_dsn}: {exc}") from None
    return site


def attach(app: Any, site: Site | None, local: Any, sources: dict[str, Any]) -> None:
    if site is None:
        app.state.peer = app.state.peer_uploads = None
        return
    hook = fill_hook(site)
    for source in sources.values():
        if hasattr(source, "site"):         # a ProxyStore: its fills go upstream
            source.site = hook
    app.state.peer = PeerState(site, local, sources)
    app.state.peer_uploads = peer_uploads.UploadPeers(site)
