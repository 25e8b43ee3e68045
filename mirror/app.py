"""create_app(config): the ASGI application.

The lifespan builds the cache (files + index), one Upstream and one ProxyStore
per configured upstream, and closes them in reverse order.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from . import metrics
from .accesslog import AccessLog
from .api import EXCEPTION_HANDLERS, ROUTES, APIVersionHeader, Registry
from .auth import Guard
from .cache import LocalCache
from .config import Config
from .evict import Budget, Evictor
from .proxy import ProxyStore
from .routing import Router
from .upstream import Upstream

log = logging.getLogger("mirror")


def create_app(config: Config) -> AccessLog:
    @asynccontextmanager
    async def lifespan(app: Starlette):
        local = await LocalCache.open(config.data_dir)
        evictor = Evictor(local, Budget.of(config))
        evictor.start()
        sources = {name: ProxyStore(local, Upstream(up), up.tag_ttl, up.offline)
                   for name, up in config.upstreams.items()}
        router = Router(config)
        guard = Guard(config.auth, router, local.data_dir, config.public_url) \
            if config.auth else None
        app.state.registry = Registry(router, sources, local.repositories, local.not_ready, guard)
        metrics.persist = local.index.count
        metrics.cache_size.set_function(lambda: local.size)
        metrics.cache_budget.set(config.max_size or 0)
        log.info("mirror ready on %s: upstreams %s (default %s), data in %s", config.listen,
                 ", ".join(f"{n}={u.url}" for n, u in config.upstreams.items()),
                 config.default, local.data_dir)
        try:
            yield
        finally:
            metrics.persist = None
            if guard is not None:
                guard.close()
            await evictor.stop()
            for source in sources.values():
                await source.aclose()
            await local.close()

    app = Starlette(routes=ROUTES, exception_handlers=EXCEPTION_HANDLERS, lifespan=lifespan)
    return AccessLog(APIVersionHeader(app), enabled=config.access_log)
