"""The ASGI application and what it runs on.

``Mirror(config).running()`` builds the cache (files + index), writes the local token
(local_access.py), makes one Upstream and one ProxyStore per configured upstream, and
closes them in reverse order; server.py enters it before it accepts connections, so a
data directory the mirror cannot use is one line (``StartupError``), not a traceback.
``create_app(config)`` is the same application with that as its ASGI lifespan, for
running it under any ASGI server.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.routing import Route as HttpRoute

from . import fileio, local_access, metrics, signing_keys, upstream_status
from .accesslog import AccessLog
from .api import EXCEPTION_HANDLERS, ROUTES, APIVersionHeader, Registry
from .auth import Guard
from .cache import CannotOpen, LocalCache
from .catalog import Catalog
from .cluster import peer_join
from .cluster.leader import Leadership
from .cluster.site_status import SiteStatus
from .config import Config
from .evict import Budget, Evictor
from .hosted.store import HostedStore
from .notify import events
from .notify.delivery import CannotQueue, Notifier
from .proxy import ProxyStore
from .routing import HOSTED, Router
from .store import Source
from .upstream_group import UpstreamGroup
from .web import actions as web_actions
from .web import routes as web_routes
from .web import session as web_session
from .web.site import Site

log = logging.getLogger("mirror")


class StartupError(Exception):
    """The mirror cannot start: one line naming the path, key or address, and what
    to do."""


@dataclass(frozen=True)
class Role:
    """This process's part in the server (workers.py). ``prepare``: clear ``tmp/``,
    reconcile the index with the files and write a new local token at start-up (one
    process, or the first start of worker 0). ``leader``: run the chores that must run
    once per data directory: eviction, hosted gc, the upload sweep, index checkpoints
    (with several replicas, a candidate for leading the site's chores: cluster/leader.py).
    ``worker``: the worker's number, None when the server is one process."""

    prepare: bool = True
    leader: bool = True
    worker: int | None = None
    previous_pid: int | None = None   # a worker that prepares: the server before crashed


class Mirror:
    def __init__(self, config: Config, role: Role = Role()) -> None:
        self.config = config
        self.role = role
        self.web = web_routes.create()        # the page at /ui/ (mirror/web)
        # The login and the actions (/ui/login, /ui/actions/...) before the pages' mount.
        self.app = Starlette(routes=[*ROUTES, *peer_join.ROUTES,
                                     HttpRoute("/", web_routes.root, methods=["GET"]),
                                     *web_session.ROUTES, *web_actions.ROUTES,
                                     Mount("/ui", app=self.web)],
                             exception_handlers=EXCEPTION_HANDLERS,
                             lifespan=lambda app: self.running())
        self.asgi = AccessLog(APIVersionHeader(web_session.SessionCookies(self.app)),
                              enabled=config.access_log)
        self.guard: Guard | None = None
        self.local: LocalCache | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        config = self.config
        role = self.role
        try:
            site = await peer_join.open_site(config)     # replicas sharing PostgreSQL
        except peer_join.CannotJoin as exc:
            raise StartupError(str(exc)) from None
        try:
            local = await LocalCache.open(config.data_dir, prepare=role.prepare,
                                          own_lock=role.worker is None, leader=role.leader,
                                          previous_pid=role.previous_pid,
                                          storage=config.storage, index=config.index)
        except CannotOpen as exc:
            if site is not None:
                await site.close()
            raise StartupError(str(exc)) from None
        self.local = local
        # Other processes write the index too: this server's other workers, or (a
        # PostgreSQL index) other replicas; their changes are followed each second.
        local.follow = role.worker is not None or config.index.postgres is not None
        try:
            local_token = await fileio.run(_local_token, local.data_dir, role.prepare)
        except OSError as exc:
            await local.close()
            raise StartupError(f"{local.data_dir / local_access.NAME}: cannot write the local "
                               f"token: {exc.strerror or exc}") from None
        try:        # the data directory's, or the site's: signing_keys.py decides
            keys = await signing_keys.load(config, local.data_dir,
                                           site.pool if site is not None else None)
        except signing_keys.CannotLoad as exc:
            await local.close()
            if site is not None:
                await site.close()
            raise StartupError(str(exc)) from None
        router = Router(config)
        notifier = Notifier(config.notifications, local.data_dir, router.display_name,
                            config.public_url, config.port, send=role.leader)
        try:
            await notifier.start()
        except CannotQueue as exc:
            await local.close()
            raise StartupError(str(exc)) from None
        status = upstream_status.Recorder(local.data_dir)
        try:
            await status.open(role.leader)
        except OSError as exc:
            await notifier.stop()
            await local.close()
            raise StartupError(f"{status.dir}: cannot write the upstream status: "
                               f"{exc.strerror or exc}") from None
        upstream_status.recorder = status
        # Site-wide chores (eviction, pruning, hosted gc) follow the site's leader; those on
        # this data directory (checkpoints, tmp/, the upload sweep, notification queues, the
        # status files) stay role.leader's.
        leadership = Leadership.of(config, role.leader)
        await leadership.start()
        if site is not None:    # the upstream status reaches the site's other replicas
            shared = SiteStatus(site.pool, site.url, leading=lambda: leadership.held)
            try:
                await shared.start()
            except Exception as exc:  # noqa: BLE001 (one line naming the key)
                where = config.index.postgres.safe_dsn if config.index.postgres else "?"
                await leadership.stop()
                await site.close()
                upstream_status.recorder = None
                await status.close()
                await notifier.stop()
                await local.close()
                raise StartupError(f"index.postgres.dsn: cannot set up the upstream status "
                                   f"table in {where}: "
                                   f"{type(exc).__name__}: {exc}"[:400]) from None
            status.shared = shared
        evictor = Evictor(local, Budget.of(config), enforce=role.leader,
                          follow=local.follow, leading=lambda: leadership.held)
        evictor.start()
        sources: dict[str, Source] = {name: ProxyStore(local, UpstreamGroup(up), up.tag_ttl,
                                                      up.offline)
                   for name, up in config.upstreams.items()}
        hosted = HostedStore(local, config.hosted) if config.hosted is not None else None
        if hosted is not None:
            await hosted.open(leader=role.leader, leading=lambda: leadership.held)
            sources[HOSTED] = hosted
        peer_join.attach(self.app, site, local, sources)
        guard = self.guard = Guard(config.auth, router, keys.token, config.public_url,
                                   local_token) if config.auth else None
        self.app.state.registry = Registry(router, sources, local.repositories,
                                           local.not_ready, guard, hosted)
        # The pages (mounted at /ui, their own app) ask the viewer as the actions do.
        self.app.state.web = self.web.state.web = web_session.WebState(config, keys.ui, local,
                                                                       hosted, local_token)
        self.web.state.registry = self.app.state.registry
        metrics.persist = local.index.count
        catalog = await Catalog.open(local.index, router.display_name)
        self.web.state.site = Site(config, local, router, catalog, hosted)
        events.sink = notifier.accept if notifier.endpoints else None
        metrics.cache_size.set_function(lambda: local.cached_size)
        metrics.hosted_size.set_function(lambda: local.hosted_size)
        metrics.cache_budget.set(config.max_size or 0)
        try:
            yield
        finally:
            metrics.persist = None
            self.web.state.site = None
            await catalog.close()
            if guard is not None:
                guard.close()
            await evictor.stop()
            for source in sources.values():
                await source.aclose()
            await leadership.stop()
            await status.unshare()              # before the site's pool closes
            if site is not None:
                await site.close()
            events.sink = None
            await notifier.stop()
            if upstream_status.recorder is status:
                upstream_status.recorder = None
            await status.close()
            await local.close()

    def summary(self) -> str:
        """What the ready line says after the address: TLS, logins, offline mode,
        the upstreams and the data directory."""
        config = self.config
        offline = [n for n, u in config.upstreams.items() if u.offline]
        if not offline:
            offline_text = "off"
        elif len(offline) == len(config.upstreams):
            offline_text = "on"
        else:
            offline_text = "on for " + ",".join(offline)
        logins = "off" if config.auth is None else \
            f"on ({'bearer tokens' if config.auth.token else 'basic'})"
        upstreams = ", ".join(
            f"{n}={u.url}" + "".join(f" +mirror {m.url} [{', '.join(sorted(m.capabilities))}]"
                                     for m in u.mirrors)
            for n, u in config.upstreams.items()) or "none"
        if config.hosted is not None:
            upstreams += f"; hosted {','.join(config.hosted.repositories) or 'nothing'}"
        data_dir = self.local.data_dir if self.local else config.data_dir.resolve()
        return (f"TLS {'on' if config.tls else 'off'}, logins {logins}, offline {offline_text}; "
                f"upstreams {upstreams} (default {config.default}); data in {data_dir}")


def _local_token(data_dir, new: bool) -> str:
    """A new local token (at a server's start), or the one the first worker wrote."""
    if not new:
        token = local_access.read(data_dir)
        if token is not None:
            return token
    return local_access.issue(data_dir)


def create_app(config: Config) -> AccessLog:
    return Mirror(config).asgi
