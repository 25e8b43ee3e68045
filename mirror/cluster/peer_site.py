"""This replica's membership of a site of replicas (``index: {postgres: {dsn}}`` set).

``Site.open(config)`` opens a small asyncpg pool of its own (whatever the index does),
applies the fill lease's and the peer secret's migrations, reads the cluster secret
(peer_auth.py) and makes the httpx client used to reach peers. A ``Site`` knows:

    url     this replica's address for its peers: ``cluster.advertise``, else
            ``http(s)://<hostname>:<port>`` (https when TLS is on)
    owner   this replica's id in the leases and the logs: ``<url> pid <pid>``
    ttl     ``cluster.lease_ttl``
    leases  the fill leases (lease.py); ``auth`` signs and checks peer requests

Peers are reached with certificate checks off: what a peer sends is a blob checked
against its digest before anything keeps it, and what we send it is signed with the
secret; a replica's certificate is usually for the load balancer's name, not its own.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import httpx

from . import schema
from .lease import Leases
from .lease import migrate as migrate_leases
from .peer_auth import PeerAuth, load_secret
from .peer_auth import migrate as migrate_auth

log = logging.getLogger("mirror.cluster")

PEER_PREFIX = "/_mirror/peer"      # the internal endpoints: never under /v2

# ``peer_recent_fills`` said which replica last downloaded a blob under the lease, for a
# replica whose stream from a dead owner broke while another took over and finished.
# The site's blobs are in its shared store and index now, which say so themselves
# (peer_fill._committed): version 2 drops the table.
RECENT_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE peer_recent_fills (
            digest   text PRIMARY KEY,
            peer_url text NOT NULL,
            at       timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX peer_recent_fills_at ON peer_recent_fills (at)",
    ],
    ["DROP TABLE IF EXISTS peer_recent_fills"],
]


class CannotJoin(Exception):
    """The replica cannot reach or set up the site's PostgreSQL: one line, no password."""


def advertised_url(config: Any) -> str:
    if config.cluster.advertise:
        return str(config.cluster.advertise).rstrip("/")
    scheme = "https" if config.tls else "http"
    return f"{scheme}://{socket.gethostname()}:{config.port}"


class Site:
    def __init__(self, pool: Any, auth: PeerAuth, url: str, ttl: float) -> None:
        self.pool = pool
        self.auth = auth
        self.url = url
        self.owner = f"{url} pid {os.getpid()}"
        self.ttl = ttl
        self.leases = Leases(pool)
        self.http = httpx.AsyncClient(verify=False, trust_env=False, follow_redirects=False,
                                      timeout=httpx.Timeout(10.0, read=60.0))

    @classmethod
    async def open(cls, config: Any) -> Site:
        # only a site of replicas needs it (the "postgres" extra)
        import asyncpg  # type: ignore[import-untyped]

        pg = config.index.postgres
        try:
            pool = await asyncpg.create_pool(pg.dsn, min_size=1, max_size=4)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise CannotJoin(f"index.postgres.dsn: cannot connect to {pg.safe_dsn}: "
                             f"{_why(exc)}") from None
        try:
            async with pool.acquire() as conn:
                await migrate_leases(conn)
                await migrate_auth(conn)
                await schema.apply(conn, "peer_recent_fills", RECENT_MIGRATIONS)
                secret = await load_secret(conn)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            await pool.close()
            raise CannotJoin(f"index.postgres.dsn: cannot set up the cluster tables in "
                             f"{pg.safe_dsn}: {_why(exc)}") from None
        site = cls(pool, PeerAuth(secret), advertised_url(config), config.cluster.lease_ttl)
        log.info("replica %s joined the site (fill lease ttl %gs)", site.owner, site.ttl)
        return site

    def peer_headers(self, method: str, path: str) -> dict[str, str]:
        return self.auth.sign(method, path)

    async def close(self) -> None:
        await self.http.aclose()
        await self.leases.close()
        await self.pool.close()


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text and text[0] else type(exc).__name__
